"""The examples and the timing of docs/headroom.md, measured with today's ``ocdwrap.headroom``.

    OMP_NUM_THREADS=1 python -m benchmarks.headroom_examples          # seed 0, a few minutes
    python -m benchmarks.headroom_examples --seeds 0 1 2               # mean ± sd over seeds
    python -m benchmarks.headroom_examples --update-doc docs/headroom.md   # re-render the tables
    python -m benchmarks.headroom_examples --smoke --out /tmp/h.json   # seconds; the plumbing

Two examples, per seed:

* **digits**: scikit-learn's 8x8 digits (1,797 images, shuffled with the seed), an MLP
  64-64-64-10 trained with Adam 1e-3, batch 32, on the first 1,200 images for 1, 3 and 40 epochs;
  ``headroom`` of its middle Linear (``"2"``, the default overfit: Adam 5e-4 x 3), the probe
  cross-fitted on the other 597 images (batches of 200). An underfitting base against a
  converged one.
* **lenet5**: LeNet5 trained as ``benchmarks.mnist`` trains its base (50k MNIST training images,
  Adam 1e-3, batch 128, early stopping on the 10k validation images, patience 3, at most 30
  epochs, best weights kept); ``headroom`` of ``fc2`` on the first 2,000 validation images
  (batches of 500), once with the probe cross-fitted on them and once with ``train_loader=`` the
  first 10,000 training images (batches of 1,000). Each report is timed (the base training is
  not part of it), with the load average beside it.

``--out`` (default ``docs/results/headroom_examples.json``) gets every report (``to_dict()``),
its seconds and the load average, with the command, machine, torch, threads and date.
``--update-doc DOC`` re-renders the blocks of DOC between ``<!-- headroom-examples: JSON SECTION
-->`` and ``<!-- /headroom-examples -->`` (SECTION: ``digits``, ``lenet5``, ``probes`` or
``timing``) from the JSON, so that no number of those tables is typed by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import ocdwrap
from ocdwrap.headroom import ROWS

from .cli import command
from .results import current_names, fmt_mean_sd
from .timing import log, machine

MODULE = "benchmarks.headroom_examples"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = "docs/results/headroom_examples.json"
DOC_START = "<!-- headroom-examples: "
DOC_END = "<!-- /headroom-examples -->"
FREE = ("own_label", "probe", "probe_mixture")
CE = nn.CrossEntropyLoss(reduction="none")


# --------------------------------------------------------------------------- runs


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _report(model: ocdwrap.OCDModel, loader: Any, **kw: Any) -> dict[str, Any]:
    """``headroom`` of ``model`` on ``loader``: its ``to_dict()``, the wall seconds and the load
    average (1, 5, 15 min) at the start and the end."""
    load = _load()
    start = time.perf_counter()
    report = ocdwrap.headroom(model, loader, CE, **kw)
    seconds = time.perf_counter() - start
    log(f"  ceiling {report.ceiling:.1f} %, {seconds:.1f} s (load {load[0]})")
    return {**report.to_dict(), "wall_seconds": seconds, "load_start": load, "load_end": _load()}


def digits_mlp(epochs: int, seed: int, n_train: int = 1200) -> tuple[nn.Module, list]:
    """The digits MLP 64-64-64-10 trained ``epochs`` epochs (Adam 1e-3, batch 32) on the first
    ``n_train`` images of the shuffled data set; the other images in batches of 200."""
    from sklearn.datasets import load_digits

    d = load_digits()
    perm = torch.randperm(len(d.target), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(d.data, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(d.target)[perm]
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(n_train)
        for i in range(0, n_train, 32):
            idx = order[i : i + 32]
            loss = CE(net(x[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    held = [(x[i : i + 200], y[i : i + 200]) for i in range(n_train, len(y), 200)]
    return net.eval(), held


def run_digits(args: Any, seed: int) -> dict[str, Any]:
    out = {}
    for epochs in args.digits_epochs:
        log(f"digits, seed {seed}: MLP trained {epochs} epoch(s)")
        net, held = digits_mlp(epochs, seed, args.digits_train)
        out[str(epochs)] = _report(ocdwrap.wrap(net, layer="2"), held, seed=seed)
    return out


def run_lenet5(args: Any, seed: int, data: dict[str, Any]) -> dict[str, Any]:
    from .datasets import tensor_loader
    from .zoo import LeNet5, train_base

    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    log(f"lenet5, seed {seed}: training the base on {len(xtr):,} images (not timed below)")
    torch.manual_seed(seed)
    base = LeNet5()
    tr = train_base(
        base,
        tensor_loader(xtr, ytr, 128, shuffle=True, seed=seed),
        tensor_loader(xva, yva, 1000),
        CE,
        max_epochs=args.max_epochs,
        patience=3,
        seed=seed,
        progress=False,
    )
    out: dict[str, Any] = {
        "base_training": {
            "epochs_run": tr.epochs_run,
            "best_epoch": tr.best_epoch,
            "stopped_early": tr.stopped_early,
            "best_val_loss": tr.best_val_loss,
            "seconds": tr.seconds,
        }
    }
    log(f"  {out['base_training']}")
    model = ocdwrap.wrap(base.eval(), layer="fc2")  # OCDConfig(): Adam 5e-4 x 3
    n = args.val_samples
    val = tensor_loader(xva[:n], yva[:n], 500)
    log(f"  headroom on {n:,} validation images, probe cross-fitted")
    out["cross_fitted"] = _report(model, val, seed=seed)
    m = args.train_samples
    log(f"  headroom with train_loader= the first {m:,} training images")
    train = tensor_loader(xtr[:m], ytr[:m], 1000)
    out["train_loader"] = _report(model, val, seed=seed, train_loader=train)
    model.unload()
    return out


def parse_args(argv: Sequence[str] | None) -> Any:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the JSON (default {DEFAULT_OUT})")
    p.add_argument(
        "--update-doc",
        metavar="DOC",
        default=None,
        help="re-render DOC's headroom-examples blocks from their JSONs, run nothing",
    )
    p.add_argument("--digits-epochs", type=int, nargs="+", default=[1, 3, 40])
    p.add_argument("--digits-train", type=int, default=1200, help="digits training images")
    p.add_argument("--mnist-train", type=int, default=50000, help="LeNet5 training images")
    p.add_argument("--max-epochs", type=int, default=30, help="LeNet5 training epochs at most")
    p.add_argument("--val-samples", type=int, default=2000, help="held-out MNIST images")
    p.add_argument(
        "--train-samples", type=int, default=10000, help="training images of train_loader="
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.digits_epochs, args.digits_train = [1], 1500
        args.mnist_train, args.max_epochs = 1000, 1
        args.val_samples, args.train_samples = 100, 200
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.update_doc:
        print(f"{args.update_doc}: {update_doc(args.update_doc)} blocks rendered")
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "benchmark": "headroom_examples",
        "command": command(MODULE, argv),
        "date": datetime.date.today().isoformat(),
        "machine": machine("cpu"),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "seeds": list(args.seeds),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "update_doc")},
        "load_start": _load(),
        "digits": {},
        "lenet5": {},
    }

    def save() -> None:
        out["seconds"] = time.perf_counter() - t0
        out["load_end"] = _load()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")

    from .datasets import load_mnist

    data = load_mnist()
    data["train"] = tuple(t[: args.mnist_train] for t in data["train"])
    for seed in args.seeds:
        out["digits"][str(seed)] = run_digits(args, seed)
        save()
        out["lenet5"][str(seed)] = run_lenet5(args, seed, data)
        save()
    log(f"wrote {args.out} ({out['seconds'] / 60:.1f} min)")
    for section in SECTIONS:
        print(SECTIONS[section](out) + "\n")
    return out


# --------------------------------------------------------------------------- the doc's tables


def _cell(values: Sequence[float | None], fmt: str, scale: float = 1.0) -> str:
    vals = [scale * v for v in values if v is not None]
    return fmt_mean_sd(vals, fmt) if vals else "-"


def _mean(values: Sequence[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("-inf")


def _source(d: dict[str, Any], path: str) -> str:
    seeds = ", ".join(map(str, d["seeds"]))
    loads = [
        r["load_start"][0]
        for part in ("digits", "lenet5")
        for seed in d[part].values()
        for r in seed.values()
        if "load_start" in r
    ]
    load = f"load average {min(loads):.1f}-{max(loads):.1f}" if loads else "load average -"
    return (
        f"From `{path}`: `{d['command']}`; seed(s) {seeds} (mean ± sd over seeds where there are "
        f"several); {d['machine']}, shared ({load} at the reports' starts); torch {d['torch']}, "
        f"{d['threads']} thread(s); {d['date']}."
    )


def digits_table(d: dict[str, Any]) -> str:
    """Per training length: base and bound loss / accuracy, each label-free row's share of the
    loss gap (the best in bold), the probe's own loss / accuracy."""
    lines = [
        "| base trained | base CE / acc % | bound CE / acc % | own_label | probe | probe_mixture | "
        "probe's own CE / acc % |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    epochs = list(next(iter(d["digits"].values())))
    for e in epochs:
        reps = [s[e] for s in d["digits"].values()]

        def row(name: str, key: str, reps: list = reps) -> list[float | None]:
            return [current_names(r)["rows"][name][key] for r in reps]

        best = max(FREE, key=lambda n: _mean(row(n, "share_loss")))
        shares = []
        for name in FREE:
            c = _cell(row(name, "share_loss"), ".1f") + " %"
            shares.append(f"**{c}**" if name == best else c)
        own = _cell([r["probe"]["loss"] for r in reps], ".3f")
        own += " / " + _cell([r["probe"]["accuracy"] for r in reps], ".1f", 100)
        same = sum(r["probe"]["l2"] is None for r in reps)
        if same:
            own += " (= base)" if same == len(reps) else f" (= base on {same} of {len(reps)} seeds)"
        lines.append(
            f"| {e} epoch{'s' if e != '1' else ''} | {_cell(row('base', 'loss'), '.3f')} / "
            f"{_cell(row('base', 'accuracy'), '.1f', 100)} | "
            f"{_cell(row('overfit', 'loss'), '.3f')} / "
            f"{_cell(row('overfit', 'accuracy'), '.1f', 100)} | "
            + " | ".join(shares)
            + f" | {own} |"
        )
    n = next(iter(next(iter(d["digits"].values())).values()))["n"]
    lines += ["", f"(shares of the loss gap; {n} held-out images, cross-fitted probe)"]
    return "\n".join(lines)


def lenet5_table(d: dict[str, Any], which: str = "cross_fitted") -> str:
    """The report's own table (mean ± sd over seeds) for the ``which`` probe."""
    reps = [s[which] for s in d["lenet5"].values()]
    lines = [
        "| row | loss | acc % | share of gap (loss) | share of gap (acc) | cos | cos, base right "
        "| cos, base wrong |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ROWS:
        vals = [current_names(r)["rows"][name] for r in reps]
        cells = [
            _cell([v["loss"] for v in vals], ".4f"),
            _cell([v["accuracy"] for v in vals], ".2f", 100),
            *(_cell([v[k] for v in vals], ".1f") for k in ("share_loss", "share_accuracy")),
            *(
                _cell([v[k] for v in vals], ".2f")
                for k in ("cosine", "cosine_base_correct", "cosine_base_wrong")
            ),
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    r = reps[0]
    lines += [
        "",
        f"({r['n']:,} validation images; base right / wrong: "
        + ", ".join(f"{x['n_base_correct']:,} / {x['n_base_wrong']:,}" for x in reps)
        + f"; {r['probe']['source']})",
    ]
    return "\n".join(lines)


def probes_table(d: dict[str, Any]) -> str:
    """LeNet5: the cross-fitted probe against the one fitted on ``train_loader``."""
    lines = [
        "| probe fitted on | probe's own CE | probe's own acc % | probe row | probe_mixture row "
        "| ceiling (the verdict) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = [s["cross_fitted"]["rows"]["base"] for s in d["lenet5"].values()]
    lines.append(
        f"| (the base itself) | {_cell([b['loss'] for b in base], '.4f')} | "
        f"{_cell([b['accuracy'] for b in base], '.2f', 100)} | | | |"
    )
    for which in ("cross_fitted", "train_loader"):
        reps = [s[which] for s in d["lenet5"].values()]
        lines.append(
            f"| {reps[0]['probe']['source']} | {_cell([r['probe']['loss'] for r in reps], '.4f')}"
            f" | {_cell([r['probe']['accuracy'] for r in reps], '.2f', 100)} | "
            f"{_cell([r['rows']['probe']['share_loss'] for r in reps], '.1f')} % | "
            f"{_cell([r['rows']['probe_mixture']['share_loss'] for r in reps], '.1f')} % | "
            f"{_cell([r['ceiling'] for r in reps], '.1f')} % |"
        )
    lines += ["", "(shares of the loss gap)"]
    return "\n".join(lines)


def timing_table(d: dict[str, Any]) -> str:
    """Seconds of each report (and of the LeNet5 base training, which no report includes), per
    seed, with the 1-minute load average at its start."""
    lines = [
        "| what | held-out samples | probe fitted on | seconds, per seed | load average at start |",
        "| --- | ---: | --- | --- | --- |",
    ]
    seeds = list(d["lenet5"])

    def per_seed(vals: Sequence[float]) -> str:
        return " / ".join(f"{v:.1f}" for v in vals)

    lines.append(
        "| LeNet5 base training (not part of any report) | | | "
        + per_seed([d["lenet5"][s]["base_training"]["seconds"] for s in seeds])
        + " | |"
    )
    held = "cross-fitted on the held-out images"
    for which in ("cross_fitted", "train_loader"):
        reps = [d["lenet5"][s][which] for s in seeds]
        fitted = held
        if which == "train_loader":
            fitted = f"`train_loader=` ({d['settings']['train_samples']:,} training images)"
        lines.append(
            f"| LeNet5 `fc2`, the whole report | {reps[0]['n']:,} | {fitted} | "
            f"{per_seed([r['wall_seconds'] for r in reps])} | "
            + " / ".join(f"{r['load_start'][0]:.1f}" for r in reps)
            + " |"
        )
    for e in next(iter(d["digits"].values())):
        reps = [d["digits"][s][e] for s in seeds]
        lines.append(
            f"| digits MLP ({e} epoch{'s' if e != '1' else ''}), the whole report | "
            f"{reps[0]['n']:,} | {held} | "
            f"{per_seed([r['wall_seconds'] for r in reps])} | "
            + " / ".join(f"{r['load_start'][0]:.1f}" for r in reps)
            + " |"
        )
    return "\n".join(lines)


SECTIONS = {
    "digits": digits_table,
    "lenet5": lenet5_table,
    "probes": probes_table,
    "timing": timing_table,
}


def render_block(path: str, section: str) -> str:
    """The markdown of ``section`` of the JSON at ``path`` (relative to the repository root),
    under a line naming the JSON, its command, seeds, machine and date."""
    with open(os.path.join(ROOT, path)) as f:
        d = json.load(f)
    if section not in SECTIONS:
        raise ValueError(f"unknown section {section!r}; one of {sorted(SECTIONS)}")
    return f"{_source(d, path)}\n\n{SECTIONS[section](d)}"


def update_doc(doc: str) -> int:
    """Re-render every ``<!-- headroom-examples: JSON SECTION -->`` ... ``<!-- /headroom-examples
    -->`` block of ``doc``; returns the number of blocks."""
    with open(doc) as f:
        lines = f.read().split("\n")
    out, count, skipping = [], 0, False
    for line in lines:
        if skipping:
            if line.strip() == DOC_END:
                out.append(line)
                skipping = False
            continue
        out.append(line)
        if line.startswith(DOC_START):
            path, section = line[len(DOC_START) :].split("-->")[0].split()
            out += ["", render_block(path, section), ""]
            count += 1
            skipping = True
    if skipping:
        raise ValueError(f"{doc}: a headroom-examples block is not closed with {DOC_END}")
    with open(doc, "w") as f:
        f.write("\n".join(out))
    return count


if __name__ == "__main__":
    main()
