"""The note lines under each benchmark table, and the uncertainty table of the text benchmark.

Every script ends its table with the same kinds of line: the share of the base -> overfit-on-test
gap OCD captured (:func:`gap_notes`), how the base and the compute-matched base were trained
(:func:`training_notes`), what OCD cost and how its fit ended (:func:`ocd_note`), which layer the
"alternative layer" row used (:func:`selection_note`) and how close each generator's deltas came
to the overfit-on-test ones (:func:`agreement_note`). They are written into the JSON with the
table, so that docs/results.md renders them verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .results import Results, fmt_mean_sd


def training_notes(res: Results, base: str, stopping: str) -> list[str]:
    """The two control lines every table carries: how the base was trained (``base``, e.g.
    "LeNet5, Adam 1e-3, batch 128"; ``stopping``, e.g. "patience 3") and how long the
    compute-matched base was trained further."""
    infos = list(res.info.values())
    out = []
    bt = [i["base_training"] for i in infos if "base_training" in i]
    if bt:
        out.append(
            f"base: {base}, early stopping on the validation split ({stopping}): epochs run "
            f"{[b['epochs_run'] for b in bt]}, best epoch {[b['best_epoch'] for b in bt]}, "
            f"stopped early {[b['stopped_early'] for b in bt]}"
        )
    cm = [i["compute_matched"] for i in infos if "compute_matched" in i]
    if cm:
        out.append(
            "compute-matched: the base trained further with Adam 1e-4 for "
            f"{[round(c['seconds']) for c in cm]} s (= OCD collection + fit wall time), "
            f"{[c['steps'] for c in cm]} steps"
        )
    return out


def ocd_note(res: Results, key: str = "ocd") -> list[str]:
    """One line on the OCD run of every seed (``res.info[seed][key]``): its cost, the spread
    of the delta size across training samples, and the scale model's final loss."""
    t = [i[key] for i in res.info.values() if key in i]
    if not t:
        return []
    return [
        f"OCD per seed: collect {[round(x['collect_s'], 1) for x in t]} s, fit "
        f"{[round(x['fit_s']) for x in t]} s; delta size spread across training samples, rho_cv = "
        f"sd/mean: {[round(x['collect_summary']['rho_cv'], 3) for x in t]}; scale-model loss at the "
        f"end of fit (dB, lower is better): {[round(x['fit_final_scale_dB'], 1) for x in t]}"
    ]


def selection_note(res: Results, layer: str, calib: str, linear_only: bool) -> list[str]:
    """The "alternative layer" row's line: which layer :func:`alternative_layer` chose per seed."""
    sel = [i["selection"] for i in res.info.values() if "selection" in i]
    if not sel:
        return []
    only = ", Linear layers only: rank-one deltas" if linear_only else ""
    return [
        f"alternative layer: the highest-ranked layer other than {layer} by select_layer "
        f"(gaussian, 32 draws, {calib}{only}): {[s['chosen_alternative'] for s in sel]}; "
        f"select_layer's own pick {[s['best'] for s in sel]}, {layer} ranked "
        f"{[s['main_layer_rank'] for s in sel]}"
    ]


def uncertainty_table(reports: Sequence[dict[str, Any]]) -> str:
    """Mean ± sd over seeds of ``UncertaintyReport.to_dict()`` results, as two markdown tables:
    each score's AUROC for spotting wrong predictions, then accuracy and calibration."""
    from ocdwrap.analysis.uncertainty import SCORE_NAMES

    if not reports:
        return ""
    k = reports[0]["num_draws"]

    def cell(*keys: str, fmt: str = ".4f", scale: float = 1.0) -> str:
        values = []
        for r in reports:
            for k in keys:
                r = r[k]
            values.append(scale * float(r))
        return fmt_mean_sd(values, fmt)

    lines = [
        f"| score for 'this prediction is wrong' | AUROC, OCD({k}) wrong | AUROC, base wrong |",
        "| --- | --- | --- |",
    ]
    for key, label in SCORE_NAMES.items():
        lines.append(
            f"| {label} | {cell('auroc', 'ocd_wrong', key)} | {cell('auroc', 'base_wrong', key)} |"
        )
    added = []
    for target in ("ocd_wrong", "base_wrong"):
        above = sum(r["added_value"][target]["difference_low"] > 0 for r in reports)
        added.append(
            f"{cell('added_value', target, 'difference', fmt='+.4f')} "
            f"({above} of {len(reports)} with the 95 % interval above 0)"
        )
    lines.append(
        "| AUROC added by the spread to 1 - MSP (logistic, cross-validated) | "
        + " | ".join(added)
        + " |"
    )
    lines += [
        "",
        f"| calibration ({reports[0]['n_bins']} bins) | base | OCD({k}) |",
        "| --- | --- | --- |",
        f"| accuracy (%) | {cell('accuracy', 'base', fmt='.2f', scale=100)} "
        f"| {cell('accuracy', 'ocd', fmt='.2f', scale=100)} |",
        f"| wrong predictions | {cell('errors', 'base', fmt='.0f')} "
        f"| {cell('errors', 'ocd', fmt='.0f')} |",
        f"| expected calibration error | {cell('ece', 'base')} | {cell('ece', 'ocd')} |",
        f"| Spearman(spread, 1 - MSP) | | {cell('spearman_spread_vs_base_msp', fmt='.3f')} |",
    ]
    return "\n".join(lines)


def gap_notes(
    res: Results, metric: str, paper: dict[str, float | None], upper: str = "overfit"
) -> list[str]:
    """One line per OCD row: the fraction of the base -> overfit-on-test gap captured."""
    lines = []
    for key in ("ocd", "ocd_k"):
        vals = res.gap(key, "base", upper, metric)
        if not vals:
            continue
        label = next(r.label for r in res.rows if r.key == key)
        p = paper.get(key)
        ptxt = f"paper: {100 * p:.0f} %" if p is not None else "paper: —"
        lines.append(
            f"{label}: captures {fmt_mean_sd([100 * v for v in vals], '.1f')} % of the base → "
            f"overfit-on-test gap in {metric} ({ptxt}); negative means worse than the base"
        )
    return lines


def other_gaps_note(
    res: Results, metric: str, keys: tuple[str, ...], upper: str = "overfit"
) -> list[str]:
    """One line: the share of the base -> overfit-on-test gap each of the other rows ``keys``
    took (mean ± sd over the seeds that have the row)."""
    shares = []
    for key in keys:
        vals = res.gap(key, "base", upper, metric)
        if vals:
            shares.append(f"{key} {fmt_mean_sd([100 * v for v in vals], '.1f')} % (n={len(vals)})")
    if not shares:
        return []
    return [
        f"share of the base → overfit-on-test gap in {metric} taken by the other rows (negative: "
        "worse than the base): " + "; ".join(shares)
    ]


def agreement_note(res: Results, key: str = "ocd", prefix: str = "") -> list[str]:
    """The line on how close each generator's deltas were to the overfit-on-test deltas, for the
    OCD run stored under ``res.info[seed][key]`` (none if no seed has one), led by ``prefix``."""
    infos = list(res.info.values())
    parts = []
    names = {
        "ocd": "OCD",
        "regression": "regression",
        "nearest": "nearest neighbour",
        "own_label": "own-label overfit",
    }
    for name, label in names.items():
        vals = [
            i[key]["agreement"][name] for i in infos if name in i.get(key, {}).get("agreement", {})
        ]
        if not vals:
            continue
        text = f"{label} {fmt_mean_sd([v['cos'] for v in vals], '.2f')}"
        if "abs_cos" in vals[0]:
            text += f" (|cos| {fmt_mean_sd([v['abs_cos'] for v in vals], '.2f')})"
        if "cos_base_wrong" in vals[0]:
            text += (
                f" (base right {fmt_mean_sd([v['cos_base_right'] for v in vals], '.2f')}, "
                f"base wrong {fmt_mean_sd([v['cos_base_wrong'] for v in vals], '.2f')})"
            )
        text += f", norm ratio {fmt_mean_sd([v['norm_ratio_median'] for v in vals], '.2f')}"
        parts.append(text)
    if not parts:
        return []
    n = infos[0][key]["agreement"][next(iter(infos[0][key]["agreement"]))]["n"]
    return [
        prefix
        + f"cosine between a method's delta and the overfit-on-test delta (true label), mean over the first "
        f"{n} test samples; median norm ratio: " + "; ".join(parts)
    ]


def headroom_note(res: Results) -> list[str]:
    """The headroom report's prediction per seed: the ceiling and each label-free row's share."""
    reports = [i["headroom"] for i in res.info.values() if i.get("headroom")]
    if not reports:
        return []

    def share(r: dict[str, Any], row: str) -> str:
        v = r["rows"].get(row, {}).get("share_loss")
        return "-" if v is None else f"{round(v)} %"  # (no "-0 %")

    parts = [
        f"ceiling {'-' if r['ceiling'] is None else format(r['ceiling'], '.0f') + ' %'} "
        f"(probe {share(r, 'probe')}, mixture {share(r, 'probe_mixture')}, own label "
        f"{share(r, 'own_label')})"
        for r in reports
    ]
    n = reports[0]["n"]
    return [
        f"headroom report (ocdwrap.headroom on {n} held-out samples, before collecting; share of "
        f"the base → overfit-on-those-samples gap in loss), per seed: " + "; ".join(parts)
    ]


def compare_note(res: Results, key: str = "ocd") -> list[str]:
    """ocdwrap.compare's verdict of every seed (``res.info[seed][key]["comparison"]``): the best
    row without test labels and where OCD stands against it, with the paired intervals."""
    found = [
        (seed, i[key]["comparison"])
        for seed, i in res.info.items()
        if "comparison" in i.get(key, {})
    ]
    if not found:
        return []
    parts = [f"seed {seed}: {c['verdict']}" for seed, c in found]
    return [
        "ocdwrap.compare (the shared rows; share of the base → overfit-on-test gap in loss, "
        f"95 % paired bootstrap over the {found[0][1]['n']} test samples): " + " ".join(parts)
    ]


def standard_notes(res: Results, metrics: Sequence[str], paper: dict[str, dict]) -> list[str]:
    """The lines every table ends with: the gap OCD captured in each of ``metrics`` (``paper``:
    metric -> the paper's share per OCD row), compare's verdict, the OCD run's cost, the
    headroom report and the agreement of OCD's deltas with the overfit-on-test ones."""
    out = []
    for m in metrics:
        out += gap_notes(res, m, paper.get(m, {}))
    out += compare_note(res)
    out += ocd_note(res)
    out += headroom_note(res)
    out += agreement_note(res)
    return out
