"""Sampling steps: what fewer denoising steps cost in accuracy, and what they save in time.

    python -m benchmarks.sampling_steps --domain mnist --json runs/steps_mnist.json
    python -m benchmarks.sampling_steps --domain tabular --json runs/steps_tabular.json
    python -m benchmarks.sampling_steps --smoke                 # seconds; checks the plumbing

The rank-one generator's inference cost is its denoiser passes, one per sampling step (10 in
the released code). This runs, per seed, the CPU default of ``benchmarks.mnist`` (LeNet5, OCD on
``fc2``, 20k training images collected, 3,000 fit steps) or ``benchmarks.tabular`` (the
California Housing MLP, OCD on ``blocks.0.linear``) once, then scores the same fitted
generator at each of ``--steps`` deterministic DDIM steps (one draw and the K-draw ensemble,
the same seed), beside the base and the overfit-on-test bound, and times the OCD forward
against the base forward at batch 256 on test inputs for each step count (median of paired
ratios, OCD and base run back to back).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import torch
from torch import nn

import ocdwrap

from . import cli
from .datasets import load_california_housing, load_mnist, tensor_loader
from .experiment import base_row
from .results import Metric, Results, Row
from .scoring import Task, evaluate_ocd
from .timing import log, timed
from .zoo import LeNet5, TabularMLP

MODULE = "benchmarks.sampling_steps"
DOMAINS = {
    "mnist": dict(
        layer="fc2", metrics=[Metric("loss", "test CE", ".4f"), Metric("acc", "acc %", ".2f")]
    ),
    "tabular": dict(layer="blocks.0.linear", metrics=[Metric("rmse", "test RMSE", ".4f")]),
}
TIME = Metric("overhead", "OCD / base forward, batch 256", ".2f")


def parse_args(argv: list[str] | None) -> Any:
    p = cli.base_parser(MODULE, __doc__)
    p.add_argument("--domain", choices=list(DOMAINS), default="mnist")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    p.add_argument("--train-samples", type=int, default=20000, help="MNIST images overfitted")
    p.add_argument("--timing-reps", type=int, default=11)
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.fit_steps, args.draws = args.seeds[:1], args.fit_steps or 20, 2
        args.train_samples, args.steps, args.timing_reps = 300, [1, 3], 2
        args.headroom_samples = 0
    return cli.resolve_defaults(args)


def rows(args: Any) -> list[Row]:
    out = [Row("base", "base (early stopping on val split)")]
    for s in args.steps:
        out.append(Row(f"ocd@{s}", f"OCD, 1 draw, {s} DDIM step{'s' * (s > 1)}"))
    for s in args.steps:
        out.append(Row(f"ocd_k@{s}", f"OCD({args.draws}), {s} DDIM step{'s' * (s > 1)}"))
    out.append(Row("overfit", "overfit on test (upper bound)"))
    return out


def load(args: Any) -> tuple[dict, Task, nn.Module, dict]:
    """Data, task, a fresh base and its training recipe, as the domain's own benchmark has them."""
    if args.domain == "mnist":
        data = load_mnist()
        if args.smoke:
            data = {
                k: tuple(t[: (2000 if k == "train" else 500)] for t in v) for k, v in data.items()
            }
        recipe = dict(
            batch_size=128, val_batch_size=1000, max_epochs=1 if args.smoke else 30, patience=3
        )
        return data, Task.classification(), LeNet5, recipe
    raw = load_california_housing(seed=0, normalization="standard")
    data = {k: raw[k] for k in ("train", "val", "test")}
    if args.smoke:
        data = {k: tuple(t[:1000] for t in v) for k, v in data.items()}
    recipe = dict(
        batch_size=256, val_batch_size=1024, max_epochs=2 if args.smoke else 300, patience=16
    )
    n_features = data["train"][0].shape[1]
    return data, Task.regression(raw["y_std"]), lambda: TabularMLP(n_features, n_layers=3), recipe


def overhead(model: ocdwrap.OCDModel, x: torch.Tensor, reps: int) -> float:
    """Median over ``reps`` of (OCD forward time / base forward time), run back to back."""
    ratios = []
    with torch.no_grad():
        for i in range(reps + 1):
            _, t_ocd = timed(lambda: model(x))
            with model.disable_ocd():
                _, t_base = timed(lambda: model(x))
            if i:  # the first pair warms up
                ratios.append(t_ocd / t_base)
    return statistics.median(ratios)


def run_seed(args: Any, seed: int, res: Results, workdir: str) -> None:
    data, task, make_base, recipe = load(args)
    layer = DOMAINS[args.domain]["layer"]
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    test = tensor_loader(xte, yte, 1000)
    res.info[seed] = {}
    torch.manual_seed(seed)
    base = make_base()
    base_row(
        res, seed, base, (xtr, ytr), (xva, yva), test, task, device="cpu", progress=False, **recipe
    )
    kw = {} if args.domain == "mnist" else {"task": "regression"}  # as the domain's own benchmark
    cfg = cli.ocd_config(args, seed, **kw)
    n = min(args.train_samples, len(xtr)) if args.domain == "mnist" else len(xtr)
    collect = tensor_loader(xtr[:n], ytr[:n], 256 if args.domain == "mnist" else 1024)
    model = ocdwrap.wrap(base, layer=layer, config=cfg)
    try:
        store = ocdwrap.collect(
            model, collect, task.loss_fn, os.path.join(workdir, f"s{seed}"), overwrite=True
        )
        _, res.info[seed]["fit_s"] = timed(lambda: ocdwrap.fit(model, store, seed=seed))
        res.add(seed, "overfit", evaluate_ocd(model, test, task, mode="overfit"))
        for s in args.steps:
            with model.sampling(sampling_steps=s):
                one = evaluate_ocd(model, test, task, num_draws=1, seed=seed)
                k = evaluate_ocd(model, test, task, num_draws=args.draws, seed=seed)
                one["overhead"] = overhead(model, xte[:256], args.timing_reps)
            res.add(seed, f"ocd@{s}", one)
            res.add(seed, f"ocd_k@{s}", k)
            log(f"seed {seed}, {s} steps: {one}; OCD({args.draws}) {k}")
    finally:
        model.unload()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = cli.setup(args)
    t0 = time.perf_counter()
    res = Results(
        f"sampling-steps-{args.domain}", rows(args), DOMAINS[args.domain]["metrics"] + [TIME]
    )
    return cli.run_seeds(
        args,
        res,
        lambda seed: run_seed(args, seed, res, workdir),
        lambda: [
            f"settings: the CPU default of benchmarks.{args.domain} (delta={args.delta}, "
            f"{args.fit_steps} fit steps, overfit Adam {args.overfit_lr:g} × 3), one fitted "
            f"generator per seed scored at each step count; deterministic DDIM (eta 0); "
            "overhead: OCD forward / base forward at batch 256, median of paired ratios"
        ],
        module=MODULE,
        argv=argv,
        title=f"Sampling steps ({args.domain}): accuracy and inference cost",
        t0=t0,
    )


if __name__ == "__main__":
    main()
