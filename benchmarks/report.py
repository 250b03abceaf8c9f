"""The markdown of benchmark JSONs: each run's table and notes, the summary over runs, and the
re-rendering of the marked blocks of docs/results.md and docs/figures.md.

    python -m benchmarks.report runs/mnist.json                     # print a run's markdown
    python -m benchmarks.report --update docs/results.md docs/figures.md

A marked block is ``<!-- render: PATH.json [SECTION] -->`` ... ``<!-- /render -->`` (or
``<!-- render: summary A.json B.json ... -->`` for :func:`summary_table`); ``--update`` replaces
what lies between the markers with the JSON's markdown, so that no number there is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from .results import METRIC_LABELS, fmt_mean_sd, gap_fraction, parts


def render(path: str, section: str | None = None) -> str:
    """The markdown of a benchmark JSON: command, date, machine, table and notes, verbatim;
    with ``section``, that markdown field of each table (e.g. ``uncertainty_table``) instead
    of the results table and notes.

    docs/results.md is assembled from this output, so that no number there is typed by hand.
    """
    with open(path) as f:
        d = json.load(f)
    out = []
    for _, part in parts(d):
        title = part.get("title")
        head = f"**{title}**\n\n" if title else ""
        seeds = sorted(int(s) for s in part["per_seed"])
        if section is not None:
            if section not in part:
                raise KeyError(
                    f"{path}: no {section!r} in {part.get('benchmark')}; rerun its script"
                )
            out.append(
                f"{head}Command: `{d['command']}`  \n"
                f"Seeds {seeds}; {d.get('machine', part.get('machine'))}; {part['date']}\n\n"
                f"{part[section]}\n"
            )
            continue
        out.append(
            f"{head}Command: `{d['command']}`  \n"
            f"Seeds {seeds}; {d.get('machine', part.get('machine'))}; torch {part['torch']}, "
            f"{part['threads']} thread(s); {part['date']}; {_duration(d)}\n\n"
            f"{part['table']}\n\n" + "\n".join(f"- {n}" for n in part["notes"]) + "\n"
        )
    return "\n".join(out)


def _duration(d: dict[str, Any]) -> str:
    """'whole run N min', or for a JSON merged from several runs (which may have run side by
    side) each run's minutes."""
    runs = d.get("run_seconds") or []
    if len(runs) > 1:
        return "runs of " + " + ".join(f"{s / 60:.0f}" for s in runs) + " min (merged)"
    return f"whole run {d.get('seconds', 0) / 60:.0f} min"


LABEL_FREE = (
    "compute_matched",
    "global",
    "regression",
    "nearest",
    "own_label",
    "probe",
    "alt",
    "sgd_ocd",
    "sgd_global",
)
LOWER_IS_BETTER = {"loss", "mse", "rmse"}
SHORT_LABELS = {
    "compute_matched": "compute-matched base",
    "global": "OCD, global ρ",
    "regression": "regression generator",
    "nearest": "nearest neighbour",
    "own_label": "own-label overfit",
    "probe": "probe overfit",
    "alt": "OCD, alternative layer",
    "sgd_ocd": "OCD, SGD deltas",
    "sgd_global": "OCD, SGD deltas, global ρ",
}
SHORT_NAMES = {
    "mnist": "MNIST / LeNet5",
    "tabular": "California Housing / MLP",
    "fashion_mnist": "Fashion-MNIST / ResNet-18",
    "ltr": "Learning to rank / MLP",
    "vit": "Fashion-MNIST / ViT",
}


def _paper_number(text: str | None) -> float | None:
    found = re.findall(r"\d*\.\d+|\d+", text or "")
    return float(found[0]) if found else None


# the scripts whose overfit lr differs from the released code's 5e-4 (their own defaults)
OVERFIT_LR_DEFAULTS = {"speech": 1e-3, "nerf": 5e-3}


def _variant(settings: dict[str, Any], benchmark: str = "") -> str:
    """What sets a run apart from its script's defaults, for the summary's first column."""
    out = []
    if settings.get("shots"):
        out.append(f"{settings['shots']}-shot")
    lr = settings.get("overfit_lr")
    if lr is not None and abs(lr - OVERFIT_LR_DEFAULTS.get(benchmark, 5e-4)) > 1e-12:
        out.append(f"overfit lr {lr:g}")
    return f" ({', '.join(out)})" if out else ""


def summary_table(paths: Sequence[str]) -> str:
    """One markdown table over several benchmark JSONs: per data set and metric, base, OCD,
    OCD(5), the best row that uses no test label, overfit on test, and the share of the
    base -> overfit-on-test gap OCD captured (mean ± sd over seeds) next to the paper's."""
    head = (
        "| data set | metric | base | OCD, 1 draw | OCD(5) | best other label-free row | "
        "overfit on test | share of the gap: OCD, 1 draw | OCD(5) | paper (OCD) |"
    )
    lines = [head, "|" + " --- |" * 10]
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        for _, part in parts(d):
            rows, per_seed = part["rows"], part["per_seed"].values()
            name = (part.get("title") or SHORT_NAMES.get(d["benchmark"], d["benchmark"])).split(
                " ("
            )[0] + _variant(d.get("settings", {}), d["benchmark"])
            if d.get("settings", {}).get("hidden_layers") == 0:
                name = name.replace("/ MLP", "/ linear model")
            metrics = next(iter(rows.values()))["metrics"]
            for metric in metrics:
                if metric == "mse" and "rmse" in metrics:
                    continue  # RMSE is the paper's figure; MSE orders the rows the same way

                def cell(k: str, m: str = metric, rows: dict = rows) -> str:
                    vals = rows[k]["metrics"][m]["values"] if k in rows else []
                    fmt = {"acc": ".2f", "mse": ".5f", "psnr": ".2f"}.get(
                        m, ".2f" if m.startswith("sisdr") else ".4f"
                    )
                    return fmt_mean_sd(vals, fmt) if vals else "—"

                sign = 1 if metric in LOWER_IS_BETTER else -1
                others = [
                    k for k in LABEL_FREE if k in rows and rows[k]["metrics"][metric]["values"]
                ]
                best = min(
                    others, key=lambda k: sign * rows[k]["metrics"][metric]["mean"], default=None
                )
                best_txt = f"{cell(best)} ({SHORT_LABELS[best]})" if best else "—"

                def share(key: str, m: str = metric, per_seed: Any = per_seed) -> str:
                    vals = [
                        100 * g
                        for r in per_seed
                        if all(k in r for k in ("base", key, "overfit"))
                        for g in [gap_fraction(r["base"][m], r[key][m], r["overfit"][m])]
                        if g is not None
                    ]
                    return f"{fmt_mean_sd(vals, '.1f')} %" if vals else "—"

                pb, po, pu = (
                    _paper_number(rows[k]["paper"].get(metric)) for k in ("base", "ocd", "overfit")
                )
                paper = gap_fraction(pb, po, pu) if None not in (pb, po, pu) else None
                lines.append(
                    f"| {name} | {METRIC_LABELS.get(metric, metric)} | {cell('base')} | {cell('ocd')} | "
                    f"{cell('ocd_k')} | {best_txt} | {cell('overfit')} | "
                    f"{share('ocd')} | {share('ocd_k')} | {'—' if paper is None else f'{100 * paper:.0f} %'} |"
                )
    return "\n".join(lines)


def _shares(part: dict[str, Any], key: str, metric: str) -> list[float]:
    """Per seed, the share (%) of the base -> overfit-on-test gap in ``metric`` row ``key`` took."""
    out = []
    for r in part["per_seed"].values():
        if all(k in r for k in ("base", key, "overfit")):
            g = gap_fraction(r["base"][metric], r[key][metric], r["overfit"][metric])
            if g is not None:
                out.append(100 * g)
    return out


def _pct(values: Sequence[float]) -> str:
    return f"{fmt_mean_sd(values, '.0f')} %" if values else "—"


def headroom_table(pairs: Sequence[tuple[str, str]]) -> str:
    """Prediction against outcome: per data set, the headroom report's ceiling (validation split,
    before collecting; ``headroom`` JSON) next to the shares of the loss gap OCD(5), the
    regression generator and the own-label overfit took on the test split (``outcome`` JSON of
    the full benchmark). Both runs train the base with the same seeds; the last column checks
    that they trained the same base (the largest relative difference of its test loss)."""
    lines = [
        "| data set | predicted ceiling | probe | own label | OCD(5) | OCD, 1 draw | regression "
        "generator | own-label overfit | same base? |",
        "|" + " --- |" * 9,
    ]
    for outcome_path, headroom_path in pairs:
        with open(outcome_path) as f:
            outcome = dict(parts(json.load(f)))
        with open(headroom_path) as f:
            d = json.load(f)
        for key, part in parts(d):
            if key not in outcome:  # a headroom run over several parts, paired part by part
                continue
            out = outcome[key]
            have = list(out["rows"]["base"]["metrics"])  # a share is the same in any affine
            metric = next(m for m in ("loss", "mse", *have) if m in have)  # form of the loss
            reports = [i["headroom"] for i in part["info"].values() if i.get("headroom")]

            def predicted(row: str | None, reports: list = reports) -> str:
                vals = [
                    r["ceiling"] if row is None else r["rows"][row]["share_loss"] for r in reports
                ]
                return _pct([v for v in vals if v is not None])

            same = [
                abs(part["per_seed"][s]["base"][metric] / out["per_seed"][s]["base"][metric] - 1)
                for s in part["per_seed"]
                if s in out["per_seed"]
            ]
            name = (part.get("title") or SHORT_NAMES.get(d["benchmark"], d["benchmark"])).split(
                " ("
            )[0] + _variant(d.get("settings", {}), d["benchmark"])
            if d.get("settings", {}).get("hidden_layers") == 0:
                name = name.replace("/ MLP", "/ linear model")
            cells = [
                _pct(_shares(out, k, metric)) for k in ("ocd_k", "ocd", "regression", "own_label")
            ]
            lines.append(
                f"| {name} | {predicted(None)} | {predicted('probe')} | {predicted('own_label')} | "
                + " | ".join(cells)
                + f" | {'yes' if same and max(same) < 1e-3 else f'no ({max(same, default=1):.1%})'} |"
            )
    return "\n".join(lines)


RENDER_START = "<!-- render: "
RENDER_END = "<!-- /render -->"


def update_markdown(doc: str) -> int:
    """Re-render every ``<!-- render: PATH.json [SECTION] -->`` ... ``<!-- /render -->`` block
    of ``doc`` (see :func:`render`).

    PATH is relative to the repository root. Returns the number of blocks rendered.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(doc) as f:
        lines = f.read().split("\n")
    out, count, skipping = [], 0, False
    for line in lines:
        if skipping:
            if line.strip() == RENDER_END:
                out.append(line)
                skipping = False
            continue
        out.append(line)
        if line.startswith(RENDER_START):
            path, *section = line[len(RENDER_START) :].split("-->")[0].split()
            if path == "summary":  # <!-- render: summary a.json b.json ... -->
                text = summary_table([os.path.join(root, p) for p in section])
            elif path == "headroom":  # <!-- render: headroom outcome.json:headroom.json ... -->
                pairs = [tuple(os.path.join(root, q) for q in p.split(":")) for p in section]
                text = headroom_table(pairs)
            else:
                text = render(os.path.join(root, path), *section[:1])
            out += ["", text.rstrip(), ""]
            count += 1
            skipping = True
    if skipping:
        raise ValueError(f"{doc}: a render block is not closed with {RENDER_END}")
    with open(doc, "w") as f:
        f.write("\n".join(out))
    return count


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.report",
        description="Print the markdown of benchmark JSONs, or re-render the marked blocks of docs.",
    )
    p.add_argument("paths", nargs="+", help="benchmark JSONs (or, with --update, markdown files)")
    p.add_argument(
        "--update",
        action="store_true",
        help="re-render every <!-- render: ... --> block of the markdown files given",
    )
    args = p.parse_args(argv)
    for path in args.paths:
        if args.update:
            print(f"{path}: {update_markdown(path)} blocks rendered")
        else:
            print(render(path))


if __name__ == "__main__":
    main()
