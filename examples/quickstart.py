"""Quickstart: OCD on LeNet5 / MNIST against every control, in one ``ocdwrap.compare`` call.

    python -m examples.quickstart                 # default: rank-one deltas, minutes on 2 cores
    python -m examples.quickstart --paper         # the paper's sizes (for a GPU)
    python -m examples.quickstart --smoke         # tiny sizes, seconds: checks the pipeline runs

Run from the repository root (the data loader and LeNet5 live in ``examples/data.py``).

Steps: train LeNet5 to convergence (early stopping on a validation split), wrap its fc2 layer
(120 -> 84, the paper's choice), and hand the wrapped model to ``ocdwrap.compare``: it overfits
fc2 on each of N training samples alone (the collection), fits the conditional diffusion model
and the scale model, and scores OCD on the 10k test set next to every control (the base, each
test sample overfitted with its true label (the bound), a regressor instead of diffusion, the
nearest training sample's delta, overfitting on the base's own or a probe's label, the base
trained further for the same wall time, and OCD with a global scale, the paper's "no scaling"
ablation). Prints the comparison (its table and verdict) and the paper's Table 1 beside our rows
that match one; ``--json PATH`` writes the comparison's numbers (``Comparison.to_dict()``) with
the base training's; ``--plots DIR`` writes the figures (compare.png: each row's share of the gap;
fit loss curves, generated vs overfit deltas, results chart; see docs/figures.md).

The steps are functions (``train_lenet``, ``make_config``, ``make_fit_args``, ``make_train_fn``,
``run``, ``print_report``, ``write_plots``) so that other examples (``examples.uncertainty``)
reuse them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ocdwrap
from examples.data import LeNet5, load_mnist, tensor_loader, train_base
from ocdwrap.generators import GlobalScale

# Lutati & Wolf (ICLR 2023), Table 1, MNIST / LeNet5: (test loss, accuracy %), by our row names
PAPER = {
    "base": ("0.080 ± 0.009", "99.2 ± 0.1"),
    "ocd": ("0.010 ± 0.006", "99.7 ± 0.1"),
    "global_scale": ("0.069", "99.3"),
    "overfit": ("0.002", "100"),
}

# the base's optimizer (examples.data.train_base): Adam, lr 1e-3, minibatches of 128; the
# compute-matched row trains a copy of the base further with the same settings
BASE_LR = 1e-3
BASE_BATCH = 128

# the probe row's probe is fitted on the first 5,000 training samples: its cross-validated fit on
# all 20,000 took about a minute of the quickstart's time on two cores
PROBE_SAMPLES = 5000


def row_labels(draws: int = 5) -> dict[str, str]:
    """Plain names of the comparison's rows (the figure's and the paper table's)."""
    return {
        "base": "base LeNet5",
        "overfit": "overfit on test (true labels; upper bound)",
        "ocd": "OCD (1 draw)",
        "ocd_k": f"OCD({draws}) ensemble",
        "regression": "regression generator (no diffusion)",
        "nearest": "nearest training sample's delta",
        "own_label": "overfit on the base's own label",
        "probe": "overfit on a probe's label",
        "compute_matched": "base trained further (compute-matched)",
        "global_scale": "OCD, global scale (1 draw)",
    }


LABELS = row_labels()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--delta", choices=["rank1", "full"], default="rank1", help="delta parameterisation"
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
        "--workdir",
        default=None,
        help="where the collection and comparison.json go (default: a temporary directory)",
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
    comparison: ocdwrap.Comparison | None = None
    # each computed row of the comparison as {"loss", "accuracy"}, in the comparison's order
    rows: dict[str, dict] = field(default_factory=dict)
    # the fit report of the configured generator ("rank1" or "full")
    reports: dict[str, ocdwrap.FitReport] = field(default_factory=dict)
    fitted: dict[str, tuple[ocdwrap.OCDConfig, ocdwrap.SamplingConfig, nn.Module]] = field(
        default_factory=dict
    )
    timings: dict[str, float] = field(default_factory=dict)
    total: float = 0.0
    cfg: ocdwrap.OCDConfig | None = None
    draws: int = 5  # ensemble size of the OCD(K) row
    extra_training: dict[str, Any] = field(default_factory=dict)  # what train_fn did

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
        tensor_loader(xtr, ytr, BASE_BATCH, shuffle=True, seed=seed),
        tensor_loader(xva, yva, 1000),
        CE,
        lr=BASE_LR,
        max_epochs=max_epochs,
        patience=2,
        device=device,
        seed=seed,
        progress=True,
    )
    return base, tr


def train_for(model: nn.Module, loader, seconds: float, *, lr: float, device: str) -> int:
    """Train ``model`` further with a fresh Adam (``lr``) on ``loader``'s batches, epoch after
    epoch, until ``seconds`` have passed; leaves it in eval mode and returns the steps taken."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for x, y in loader:
            if time.perf_counter() - start >= seconds:
                break
            loss = CE(model(x.to(device)), y.to(device)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        if steps == 0:  # an empty loader
            break
    model.eval()
    return steps


def make_train_fn(data: dict, *, seed: int, device: str, record: dict | None = None):
    """``train_fn(base_copy, seconds)`` for compare's compute-matched row: the base's optimizer
    settings (Adam, lr 1e-3, minibatches of 128 of the 50k training images), continued for the
    seconds the collection and OCD's fit took. ``record`` gets the steps it took."""
    xtr, ytr = data["train"]

    def train_more(base_copy: nn.Module, seconds: float) -> nn.Module:
        loader = tensor_loader(xtr, ytr, BASE_BATCH, shuffle=True, seed=seed + 1000)
        log(f"   compute-matched row: training a copy of the base for {seconds:.0f} s more")
        steps = train_for(base_copy, loader, seconds, lr=BASE_LR, device=device)
        if record is not None:
            record.update(seconds=seconds, steps=steps, lr=BASE_LR, batch_size=BASE_BATCH)
        return base_copy

    return train_more


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


def _log_compare_rows() -> None:
    """compare logs each row as it finishes (the "ocdwrap" logger, INFO): show them on stderr."""
    logger = logging.getLogger("ocdwrap")
    if not any(getattr(h, "_quickstart", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._quickstart = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> Pipeline:
    """Train the base, wrap fc2, and compare OCD with every control on the test set."""
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    data = load_mnist(seed=args.seed)
    if getattr(args, "smoke", False):
        data = {k: (x[: SMOKE_SPLITS[k]], y[: SMOKE_SPLITS[k]]) for k, (x, y) in data.items()}
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    n_train = len(xtr) if args.paper else min(args.train_samples, len(xtr))

    log("1/2 training the base LeNet5 to convergence (early stopping on validation loss)")
    base, tr = train_lenet(data, seed=args.seed, max_epochs=args.max_epochs, device=args.device)
    log(
        f"   {tr.epochs_run} epochs, best val loss {tr.best_val_loss:.4f}, stopped early: {tr.stopped_early}"
    )
    pipe = Pipeline(base=base, train_result=tr, data=data, n_train=n_train, draws=args.draws)
    pipe.timings["base_training"] = tr.seconds

    delta = args.delta
    cfg = make_config(delta, optimizer=args.optimizer, paper=args.paper)
    sampling = make_sampling(seed=args.seed, paper=args.paper)
    model = ocdwrap.wrap(base, layer="fc2", config=cfg, sampling=sampling)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ocdwrap-quickstart-")
    out_dir = os.path.join(workdir, f"compare-{delta}-{args.optimizer}")
    log(
        f"2/2 ocdwrap.compare: collecting fc2 deltas on {n_train} training samples, fitting, and "
        f"scoring every row on the {len(xte)} test images (in {out_dir})"
    )
    _log_compare_rows()
    t0 = time.perf_counter()
    pipe.comparison = ocdwrap.compare(
        model,
        tensor_loader(xtr[:n_train], ytr[:n_train], 256),
        tensor_loader(xte, yte, 1000),
        CE,
        out_dir=out_dir,
        train_fn=make_train_fn(
            data, seed=args.seed, device=args.device, record=pipe.extra_training
        ),
        generators={"global_scale": GlobalScale()},
        num_draws=args.draws,
        seed=args.seed,
        fit_args=make_fit_args(delta, fit_steps=args.fit_steps, paper=args.paper),
        probe_samples=min(PROBE_SAMPLES, n_train),
        overwrite=True,  # a fresh comparison each run, as a fresh collection was before
    )
    pipe.timings["compare"] = time.perf_counter() - t0
    info = pipe.comparison.info
    pipe.timings.update(
        {"collect": info.get("collect_s", 0.0), **{f"fit_{k}": v for k, v in info["fit_s"].items()}}
    )
    # compare fits the configured generator on the model itself: keep it for the figures and
    # follow-up studies, then give the base back its plain fc2
    pipe.cfg = cfg
    pipe.fitted[delta] = (cfg, sampling, model.hypernet)
    if model.fit_report is not None:
        pipe.reports[delta] = model.fit_report
    model.unload()
    pipe.rows = {
        r.name: {"loss": r.loss, "accuracy": r.metric}
        for r in pipe.comparison.rows
        if not r.skipped
    }
    pipe.total = time.perf_counter() - t_start
    return pipe


def _machine() -> str:
    return (
        f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"threads: {torch.get_num_threads()}"
    )


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def main(argv: list[str] | None = None) -> dict:
    args = smoke_sizes(parse_args(argv))
    load_start = _load()
    pipe = run(args)
    print_report(pipe, args)
    tr, cfg = pipe.train_result, pipe.cfg
    settings = {k: v for k, v in vars(args).items() if k not in ("plots", "json", "workdir")}
    command = ["python -m examples.quickstart", *(sys.argv[1:] if argv is None else argv)]
    if "OMP_NUM_THREADS" in os.environ:
        command.insert(0, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    result = {
        **pipe.comparison.to_dict(),
        "command": " ".join(command),
        "machine": _machine(),
        "load_average": {"start": load_start, "end": _load()},
        "base_training": {
            "epochs": tr.epochs_run,
            "best_epoch": tr.best_epoch,
            "best_val_loss": tr.best_val_loss,
            "stopped_early": tr.stopped_early,
            "seconds": tr.seconds,
            "optimizer": {"name": "adam", "lr": BASE_LR, "batch_size": BASE_BATCH},
            "patience": 2,
        },
        "compute_matched_training": pipe.extra_training,
        "settings": {**settings, "train_samples_used": pipe.n_train},
        "overfit": {"optimizer": args.optimizer, "lr": cfg.overfit_lr, "steps": cfg.overfit_steps},
        "paper_table1": {k: {"loss": v[0], "accuracy_percent": v[1]} for k, v in PAPER.items()},
        # the paper's OCD share of the base -> bound gap in test loss, from its Table 1
        "paper_ocd_share_percent": 100 * (0.080 - 0.010) / (0.080 - 0.002),
        "wall_seconds": {**pipe.timings, "total": pipe.total},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plots:
        for path in write_plots(args.plots, pipe, seed=args.seed):
            log(f"   wrote {path}")
    return result


def write_plots(directory: str, pipe: Pipeline, *, seed: int = 0, samples: int = 4) -> list[str]:
    """compare.png (each row's share of the gap, ``Comparison.plot``), fit_losses.png,
    deltas.png and results.png into ``directory``; returns their paths."""
    from examples.results_chart import plot_results
    from ocdwrap.analysis import plots

    os.makedirs(directory, exist_ok=True)
    paths = [pipe.comparison.plot(os.path.join(directory, "compare.png"))]
    curves = {
        ("rank-1 diffusion" if k == "rank1" else "full-matrix UNet"): r
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
    paths.append(os.path.join(directory, "results.png"))
    plot_results(
        pipe.rows,
        paper=PAPER,
        labels={k: names.get(k, k) for k in pipe.rows},
        path=paths[-1],
        title=f"LeNet5 on MNIST, fc2, {pipe.n_train} training samples overfitted, seed {seed}",
    )
    return paths


def print_report(pipe: Pipeline, args: argparse.Namespace) -> None:
    """What the run was, the comparison (its table and verdict), and the paper's Table 1 beside
    the rows that match one, on stdout."""
    tr, c = pipe.train_result, pipe.comparison
    if getattr(args, "smoke", False):
        print("\nsmoke run (--smoke): tiny sizes; the numbers below say nothing about OCD")
    print(
        f"\nLeNet5 on MNIST, layer fc2 (120->84), {pipe.n_train} training samples overfitted "
        f"({args.optimizer}, 3 steps), seed {args.seed}, delta={args.delta}; "
        f"{pipe.total / 60:.1f} min"
    )
    n_val = len(pipe.data["val"][0])
    val = f"{n_val // 1000}k" if n_val % 1000 == 0 else f"{n_val}-image"
    print(
        f"base: {tr.epochs_run} epochs, early stopping on a {val} validation split (patience 2)\n"
    )
    print(c)
    print("\nBeside the paper's Table 1 (its base is weaker: CE 0.080), where a row matches:\n")
    print("| row | test CE | test acc % | paper CE | paper acc % |")
    print("| --- | --- | --- | --- | --- |")
    names = row_labels(args.draws)
    for key, (paper_ce, paper_acc) in PAPER.items():
        r = pipe.rows.get(key)
        if r is not None:
            print(
                f"| {names[key]} | {r['loss']:.4f} | {100 * r['accuracy']:.2f} | {paper_ce} | "
                f"{paper_acc} |"
            )


if __name__ == "__main__":
    main()
