"""Quickstart: OCD on LeNet5 / MNIST, end to end, on two CPU cores.

    python -m examples.quickstart                 # default: rank-one deltas, about 5 minutes on 2 cores
    python -m examples.quickstart --delta both    # also the paper's full-matrix UNet (slow on CPU)
    python -m examples.quickstart --paper         # the paper's sizes (for a GPU)
    python -m examples.quickstart --smoke         # tiny sizes, seconds: checks the pipeline runs

Run from the repository root (the data loader and LeNet5 live in ``examples/data.py``).

Steps: train LeNet5 to convergence (early stopping on a validation split), wrap its fc2 layer
(120 -> 84, the paper's choice), overfit fc2 on each of N training samples alone (collect),
fit the conditional diffusion model and the scale model (fit), and evaluate on the 10k test set
next to the controls: the base model, OCD with a global scale, a regressor instead of diffusion,
and each test sample overfitted with its true label (the upper bound). Prints a table with the
paper's Table 1 beside ours; ``--json PATH`` writes the numbers; ``--plots DIR`` writes the
figures (fit loss curves, generated vs overfit deltas, results chart; see docs/figures.md).

The steps are functions (``train_lenet``, ``make_config``, ``make_fit_args``, ``run``,
``write_plots``) so that other examples (``examples.uncertainty``) reuse them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ocdwrap
from examples.data import LeNet5, load_mnist, tensor_loader, train_base

# Lutati & Wolf (ICLR 2023), Table 1, MNIST / LeNet5: (test loss, accuracy %)
PAPER = {
    "base": ("0.080 ± 0.009", "99.2 ± 0.1"),
    "ocd": ("0.010 ± 0.006", "99.7 ± 0.1"),
    "global_scale": ("0.069", "99.3"),
    "overfit_on_test": ("0.002", "100"),
}


def row_labels(draws: int = 5) -> dict[str, str]:
    """The table's row names for an ensemble of ``draws`` generated networks."""
    return {
        "base": "base LeNet5",
        "ocd": "OCD (1 draw)",
        "ocd_ensemble": f"OCD({draws}) ensemble",
        "global_scale": f"OCD, global scale ({draws} draws)",
        "regression": "regression generator (no diffusion)",
        "overfit_on_test": "overfit on test (true labels; upper bound)",
    }


LABELS = row_labels()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--delta",
        choices=["rank1", "full", "both"],
        default="rank1",
        help="delta parameterisation(s)",
    )
    p.add_argument(
        "--optimizer", choices=["adam", "sgd"], default="adam", help="per-sample overfit optimizer"
    )
    p.add_argument(
        "--train-samples", type=int, default=20000, help="training samples to overfit and fit on"
    )
    p.add_argument("--fit-steps", type=int, default=3000, help="hypernetwork training steps")
    p.add_argument(
        "--max-epochs", type=int, default=30, help="base training epochs at most (early stopping)"
    )
    p.add_argument("--draws", type=int, default=5, help="ensemble size of OCD(K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir", default=None, help="where deltas go (default: a temporary directory)"
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--plots", default=None, metavar="DIR", help="write the figures (PNG) into this folder"
    )
    p.add_argument(
        "--paper", action="store_true", help="paper sizes: all 50k samples, paper UNet, 20k steps"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_smoke_argument(p)
    return p.parse_args(argv)


# --smoke: the sizes of a run that takes seconds; its numbers say nothing about OCD
SMOKE_SPLITS = {"train": 2000, "val": 500, "test": 500}
SMOKE_SIZES = {"train_samples": 256, "fit_steps": 30, "max_epochs": 1, "draws": 2}


def add_smoke_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (2,000 training images, 256 overfitted, 30 fit steps, 500 test images): "
        "checks that the pipeline runs, in seconds; the numbers mean nothing",
    )


def smoke_sizes(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the --smoke sizes in place of the requested ones (as is without --smoke)."""
    if not getattr(args, "smoke", False):
        return args
    if getattr(args, "paper", False):
        raise SystemExit("--smoke and --paper contradict each other; pass one of them.")
    return argparse.Namespace(**{**vars(args), **SMOKE_SIZES})


CE = nn.CrossEntropyLoss(reduction="none")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Pipeline:
    """What :func:`run` leaves behind, for the table, the figures and follow-up studies."""

    base: nn.Module
    train_result: Any
    data: dict
    n_train: int
    rows: dict[str, dict] = field(default_factory=dict)
    # fit reports by run: "rank1", "regression", and "full", "regression_full" with --delta both
    reports: dict[str, ocdwrap.FitReport] = field(default_factory=dict)
    fitted: dict[str, tuple[ocdwrap.OCDConfig, ocdwrap.SamplingConfig, nn.Module]] = field(
        default_factory=dict
    )
    timings: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    cfg: ocdwrap.OCDConfig | None = None  # the config of the last delta run
    draws: int = 5  # ensemble size of the OCD(K) rows

    def ocd_model(self, delta: str = "rank1") -> ocdwrap.OCDModel:
        """The base wrapped again on fc2 with the hypernetwork fitted for ``delta``."""
        cfg, sampling, hypernet = self.fitted[delta]
        model = ocdwrap.OCDModel(self.base, "fc2", cfg, sampling)
        model.hypernet = hypernet
        return model


def train_lenet(data: dict, *, seed: int, max_epochs: int, device: str) -> tuple[nn.Module, Any]:
    """Train LeNet5 on MNIST to convergence (early stopping on the validation split, patience 2)."""
    (xtr, ytr), (xva, yva) = data["train"], data["val"]
    base = LeNet5()
    tr = train_base(
        base,
        tensor_loader(xtr, ytr, 128, shuffle=True, seed=seed),
        tensor_loader(xva, yva, 1000),
        CE,
        max_epochs=max_epochs,
        patience=2,
        device=device,
        seed=seed,
        progress=True,
    )
    return base, tr


def make_config(delta: str, *, optimizer: str, paper: bool) -> ocdwrap.OCDConfig:
    """The quickstart's OCDConfig for ``delta`` ("rank1" or "full")."""
    cfg_kw = dict(delta=delta, overfit_optimizer=optimizer)
    if paper:
        return ocdwrap.OCDConfig.paper(**cfg_kw)
    if delta == "full":  # a small UNet: two CPU cores cannot train the paper's in minutes
        return ocdwrap.OCDConfig(**cfg_kw, unet_channels=(16, 32, 32))
    return ocdwrap.OCDConfig(**cfg_kw)


def make_fit_args(delta: str, *, fit_steps: int, paper: bool) -> ocdwrap.FitArgs:
    """The quickstart's FitArgs: ``fit_steps`` steps in minibatches of 128 (``paper``), 32 (the
    small UNet) or 256 (rank-one deltas)."""
    if paper:
        return ocdwrap.FitArgs.paper(steps=fit_steps)
    return ocdwrap.FitArgs(steps=fit_steps, batch_size=32 if delta == "full" else 256)


def make_sampling(*, seed: int, paper: bool) -> ocdwrap.SamplingConfig:
    """The quickstart's sampling defaults: noise seeded with ``seed``; the paper's 10 DDIM steps
    with ``paper``, else the library's 2."""
    return ocdwrap.SamplingConfig.paper(seed=seed) if paper else ocdwrap.SamplingConfig(seed=seed)


def run(args: argparse.Namespace) -> Pipeline:
    """Train the base, collect, fit and evaluate every row of the table."""
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    data = load_mnist(seed=args.seed)
    if getattr(args, "smoke", False):
        data = {k: (x[: SMOKE_SPLITS[k]], y[: SMOKE_SPLITS[k]]) for k, (x, y) in data.items()}
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    n_train = len(xtr) if args.paper else min(args.train_samples, len(xtr))
    ce = CE

    log("1/4 training the base LeNet5 to convergence (early stopping on validation loss)")
    base, tr = train_lenet(data, seed=args.seed, max_epochs=args.max_epochs, device=args.device)
    log(
        f"   {tr.epochs_run} epochs, best val loss {tr.best_val_loss:.4f}, stopped early: {tr.stopped_early}"
    )

    test = tensor_loader(xte, yte, 1000)
    pipe = Pipeline(base=base, train_result=tr, data=data, n_train=n_train, draws=args.draws)
    rows, timings = pipe.rows, pipe.timings
    deltas = ["rank1", "full"] if args.delta == "both" else [args.delta]
    workdir = args.workdir or tempfile.mkdtemp(prefix="ocdwrap-quickstart-")
    for i, delta in enumerate(deltas):
        suffix = "" if i == 0 else f"_{delta}"
        cfg = make_config(delta, optimizer=args.optimizer, paper=args.paper)
        fit_args = make_fit_args(delta, fit_steps=args.fit_steps, paper=args.paper)
        sampling = make_sampling(seed=args.seed, paper=args.paper)
        pipe.cfg = cfg
        model = ocdwrap.wrap(base, layer="fc2", config=cfg, sampling=sampling)
        log(
            f"2/4 [{delta}] overfitting fc2 on {n_train} training samples, one at a time (vectorized)"
        )
        t0 = time.perf_counter()
        store = ocdwrap.collect(
            model,
            tensor_loader(xtr[:n_train], ytr[:n_train], 256),
            ce,
            os.path.join(workdir, f"deltas-{delta}-{args.optimizer}"),
            overwrite=True,
        )
        timings[f"collect{suffix}"] = time.perf_counter() - t0
        log(f"   summary: {json.dumps(store.manifest['summary'])}")

        log(f"3/4 [{delta}] fitting the conditional diffusion model and the scale model")
        t0 = time.perf_counter()
        report = ocdwrap.fit(model, store, fit_args)
        timings[f"fit{suffix}"] = time.perf_counter() - t0
        pipe.reports[delta] = report
        pipe.fitted[delta] = (cfg, sampling, model.hypernet)
        log(f"   final loss {report.final_loss:.4f} in {report.seconds:.0f} s")

        log(f"4/4 [{delta}] evaluating on the {len(xte)} test images")
        if i == 0:
            rows["base"] = ocdwrap.evaluate_ocd(model, test, ce, mode="base")
        rows["ocd" + suffix] = ocdwrap.evaluate_ocd(model, test, ce, num_draws=1, seed=args.seed)
        rows["ocd_ensemble" + suffix] = ocdwrap.evaluate_ocd(
            model, test, ce, num_draws=args.draws, seed=args.seed
        )
        with model.sampling(scale="global"):  # the training set's mean rho for every input
            rows["global_scale" + suffix] = ocdwrap.evaluate_ocd(
                model, test, ce, num_draws=args.draws, seed=args.seed
            )
        if i == 0:
            rows["overfit_on_test"] = ocdwrap.evaluate_ocd(model, test, ce, mode="overfit")
        model.unload()

        reg_cfg = cfg.replace(generator="regression")
        reg = ocdwrap.wrap(base, layer="fc2", config=reg_cfg, sampling=sampling)
        t0 = time.perf_counter()
        pipe.reports["regression" + suffix] = ocdwrap.fit(reg, store, fit_args)
        timings[f"fit_regression{suffix}"] = time.perf_counter() - t0
        rows["regression" + suffix] = ocdwrap.evaluate_ocd(
            reg, test, ce, num_draws=1, seed=args.seed
        )
        reg.unload()

    pipe.total = time.perf_counter() - t_start
    return pipe


def main(argv: list[str] | None = None) -> dict:
    args = smoke_sizes(parse_args(argv))
    pipe = run(args)
    rows, tr, n_train, cfg = pipe.rows, pipe.train_result, pipe.n_train, pipe.cfg
    print_table(rows, args, n_train, tr, pipe.total, n_val=len(pipe.data["val"][0]))
    settings = {k: v for k, v in vars(args).items() if k != "plots"}
    result = {
        "rows": {k: {"loss": v["loss"], "accuracy": v["accuracy"]} for k, v in rows.items()},
        "settings": {**settings, "train_samples_used": n_train, "base_epochs": tr.epochs_run},
        "seconds": {**pipe.timings, "total": pipe.total},
        "overfit": {"optimizer": args.optimizer, "lr": cfg.overfit_lr, "steps": cfg.overfit_steps},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plots:
        for path in write_plots(args.plots, pipe, seed=args.seed):
            log(f"   wrote {path}")
    return result


def write_plots(directory: str, pipe: Pipeline, *, seed: int = 0, samples: int = 4) -> list[str]:
    """fit_losses.png, deltas.png and results.png into ``directory``; returns their paths."""
    from examples.results_chart import plot_results
    from ocdwrap.analysis import plots

    os.makedirs(directory, exist_ok=True)
    paths = []
    curves = {
        ("rank-1 diffusion" if k == "rank1" else "full-matrix UNet" if k == "full" else k): r
        for k, r in pipe.reports.items()
    }
    paths.append(os.path.join(directory, "fit_losses.png"))
    plots.plot_fit_losses(curves, path=paths[-1])

    delta = next(iter(pipe.fitted))
    model = pipe.ocd_model(delta)
    try:
        xte, yte = pipe.data["test"]
        cmp = plots.delta_comparison(
            model,
            xte[:samples],
            yte[:samples],
            CE,
            rng=torch.Generator(device=model.device).manual_seed(seed),
        )
    finally:
        model.unload()
    paths.append(os.path.join(directory, "deltas.png"))
    plots.plot_deltas(cmp, images=xte[:samples], layer="fc2", path=paths[-1])

    names = row_labels(pipe.draws)
    labels = {
        k: names.get(k.split("_full")[0], k) + (" [full]" if k.endswith("_full") else "")
        for k in pipe.rows
    }
    paths.append(os.path.join(directory, "results.png"))
    plot_results(
        {k: {"loss": v["loss"], "accuracy": v["accuracy"]} for k, v in pipe.rows.items()},
        paper=PAPER,
        labels=labels,
        path=paths[-1],
        title=f"LeNet5 on MNIST, fc2, {pipe.n_train} training samples overfitted, seed {seed}",
    )
    return paths


def print_table(
    rows: dict,
    args: argparse.Namespace,
    n_train: int,
    tr,
    total: float,
    *,
    n_val: int = 10_000,
) -> None:
    """The results table (markdown) with the paper's Table 1 beside it, on stdout."""
    if getattr(args, "smoke", False):
        print("\nsmoke run (--smoke): tiny sizes; the numbers below say nothing about OCD")
    print(
        f"\nLeNet5 on MNIST, layer fc2 (120->84), {n_train} training samples overfitted "
        f"({args.optimizer}, 3 steps), seed {args.seed}, delta={args.delta}; {total / 60:.1f} min"
    )
    val = f"{n_val // 1000}k" if n_val % 1000 == 0 else f"{n_val}-image"
    print(
        f"base: {tr.epochs_run} epochs, early stopping on a {val} validation split (patience 2)\n"
    )
    print("| row | test CE | test acc % | paper CE | paper acc % |")
    print("| --- | --- | --- | --- | --- |")
    names = row_labels(args.draws)
    for key, r in rows.items():
        stem = key.split("_full")[0].split("_rank1")[0]
        label = names.get(stem, stem) + (" [full]" if key.endswith("_full") else "")
        paper = PAPER.get(key, ("—", "—"))
        print(
            f"| {label} | {r['loss']:.4f} | {100 * r['accuracy']:.2f} | {paper[0]} | {paper[1]} |"
        )
    base, ocd, up = rows["base"]["loss"], rows["ocd"]["loss"], rows["overfit_on_test"]["loss"]
    gap = base - up
    if gap > 0:
        print(
            f"\nOCD (1 draw) captures {100 * (base - ocd) / gap:.1f} % of the base -> overfit-on-test gap "
            f"(paper: {100 * (0.080 - 0.010) / (0.080 - 0.002):.0f} %)."
        )
    if ocd >= base:
        print("OCD did NOT lower the test cross-entropy below the base model's in this run.")


if __name__ == "__main__":
    main()
