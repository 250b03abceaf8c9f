"""Sampling steps: what fewer denoising steps cost in accuracy, and what they save in time.

    python -m benchmarks.sampling_steps --domain mnist --json runs/steps_mnist.json
    python -m benchmarks.sampling_steps --domain tabular --json runs/steps_tabular.json
    python -m benchmarks.sampling_steps --smoke                 # seconds; checks the plumbing
    python -m benchmarks.sampling_steps --domain tabular-linear --overfit-lr 0.02 \
        --delta-normalization rms --steps 2 --denoisers 256:128:3 128:64:2 --json runs/d.json

The rank-one generator's inference cost is its denoiser passes, one per sampling step (10 in
the released code). This runs, per seed, the CPU default of ``benchmarks.mnist`` (LeNet5, OCD on
``fc2``, 20k training images collected, 3,000 fit steps) or ``benchmarks.tabular`` (the
California Housing MLP, OCD on ``blocks.0.linear``) once, then scores the same fitted
generator at each of ``--steps`` deterministic DDIM steps (one draw and the K-draw ensemble,
the same seed), beside the base and the overfit-on-test bound, and times the OCD forward
against the base forward at batch 256 on test inputs for each step count (median of paired
ratios, OCD and base run back to back).

``--denoisers H:C:B ...`` compares rank-one generators of other sizes instead (MLP hidden width
H, conditioning width C, B residual blocks; the first is the reference, the library's default
256:128:3): each is fitted on the same collection and scored at each of ``--steps``, and its
generated deltas for the test inputs are compared with the reference's at the same initial
noise (cosine and norm ratio of the delta matrices, median over test samples), so a smaller
generator that only returns small or unrelated deltas shows even where the scores barely move.
Domain ``tabular-linear`` is the underfitting linear California base of docs/results.md
(``benchmarks.tabular --hidden-layers 0``: OCD on ``head``; pass ``--overfit-lr 0.02
--delta-normalization rms`` as that run did).
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
from .results import Metric, Results, Row, fmt_mean_sd
from .scoring import Task, evaluate_ocd
from .timing import log, timed
from .zoo import LeNet5, TabularMLP

MODULE = "benchmarks.sampling_steps"
DOMAINS = {
    "mnist": dict(
        layer="fc2", metrics=[Metric("loss", "test CE", ".4f"), Metric("acc", "acc %", ".2f")]
    ),
    "tabular": dict(layer="blocks.0.linear", metrics=[Metric("rmse", "test RMSE", ".4f")]),
    "tabular-linear": dict(layer="head", metrics=[Metric("rmse", "test RMSE", ".4f")]),
}
AGREE = [
    Metric("cos", "cos with the reference's deltas", ".3f"),
    Metric("norm", "norm / the reference's", ".3f"),
]
TIME = Metric("overhead", "OCD / base forward, batch 256", ".2f")


def parse_args(argv: list[str] | None) -> Any:
    p = cli.base_parser(MODULE, __doc__)
    p.add_argument("--domain", choices=list(DOMAINS), default="mnist")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    p.add_argument("--train-samples", type=int, default=20000, help="MNIST images overfitted")
    p.add_argument("--timing-reps", type=int, default=11)
    p.add_argument(
        "--denoisers",
        nargs="+",
        default=None,
        metavar="H:C:B",
        help="compare rank-one denoisers (hidden:conditioning:blocks; the first is the reference)",
    )
    args = p.parse_args(argv)
    args.denoisers = [tuple(int(v) for v in d.split(":")) for d in args.denoisers or []]
    if args.smoke:
        args.seeds, args.fit_steps, args.draws = args.seeds[:1], args.fit_steps or 20, 2
        args.train_samples, args.steps, args.timing_reps = 300, [1, 3], 2
        args.headroom_samples = 0
    return cli.resolve_defaults(args)


def _tag(d: tuple[int, int, int]) -> str:
    return f"h{d[0]}c{d[1]}b{d[2]}"


def rows(args: Any) -> list[Row]:
    out = [Row("base", "base (early stopping on val split)")]
    if args.denoisers:
        for d in args.denoisers:
            for s in args.steps:
                name = f"hidden {d[0]}, cond {d[1]}, {d[2]} blocks, {s} step{'s' * (s > 1)}"
                out.append(Row(f"ocd@{s}:{_tag(d)}", f"OCD, 1 draw, {name}"))
                out.append(Row(f"ocd_k@{s}:{_tag(d)}", f"OCD({args.draws}), {name}"))
        out.append(Row("overfit", "overfit on test (upper bound)"))
        return out
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
    layers = 0 if args.domain == "tabular-linear" else 3
    make = lambda: TabularMLP(n_features, n_layers=layers)  # noqa: E731
    return data, Task.regression(raw["y_std"]), make, recipe


def overhead(model: ocdwrap.OCDModel, x: torch.Tensor, reps: int) -> float:
    """Median over ``reps`` of (OCD forward time / base forward time), run back to back."""
    ratios = []
    with torch.no_grad():
        for i in range(reps + 1):
            _, t_ocd = timed(lambda: model(x))
            with model.disable_adapter():
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
    cfg, fit = cli.ocd_config(args), cli.fit_args(args, seed)
    n = min(args.train_samples, len(xtr)) if args.domain == "mnist" else len(xtr)
    collect = tensor_loader(xtr[:n], ytr[:n], 256 if args.domain == "mnist" else 1024)
    model = ocdwrap.wrap(
        base, layer=layer, config=cfg, sampling=cli.sampling_config(args, seed, **kw)
    )
    if args.denoisers:
        return compare_denoisers(args, seed, res, workdir, model, collect, task, test, xte)
    try:
        store = ocdwrap.collect(
            model, collect, task.loss_fn, os.path.join(workdir, f"s{seed}"), overwrite=True
        )
        _, res.info[seed]["fit_s"] = timed(lambda: ocdwrap.fit(model, store, fit))
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


def compare_denoisers(
    args: Any,
    seed: int,
    res: Results,
    workdir: str,
    model: ocdwrap.OCDModel,
    collect: Any,
    task: Task,
    test: Any,
    xte: torch.Tensor,
) -> None:
    """One collection; per ``--denoisers`` entry a generator fitted on it and scored at each of
    ``--steps``; its deltas on the first 1,000 test inputs compared with the first entry's at
    the same initial noise (one draw each, the seed's generator)."""
    store = ocdwrap.collect(
        model, collect, task.loss_fn, os.path.join(workdir, f"s{seed}"), overwrite=True
    )
    res.add(seed, "overfit", evaluate_ocd(model, test, task, mode="overfit"))
    xs = xte[:1000]
    reference: dict[int, torch.Tensor] = {}
    base = model.unload()
    for d in args.denoisers:
        cfg = model.config.replace(mlp_hidden=d[0], cond_dim=d[1], mlp_layers=d[2])
        m = ocdwrap.wrap(base, layer=model.layer_name, config=cfg, sampling=model.sampling_config)
        try:
            _, fit_s = timed(lambda m=m: ocdwrap.fit(m, store, cli.fit_args(args, seed)))
            res.info[seed][f"fit_s:{_tag(d)}"] = fit_s
            with torch.no_grad():
                cond, _ = m.conditioning(xs)
            for s in args.steps:
                with m.sampling(sampling_steps=s):
                    one = evaluate_ocd(m, test, task, num_draws=1, seed=seed)
                    k = evaluate_ocd(m, test, task, num_draws=args.draws, seed=seed)
                    one["overhead"] = overhead(m, xte[:256], args.timing_reps)
                    rng = torch.Generator().manual_seed(seed)
                    deltas = m.generate(cond, rng=rng).full().reshape(len(xs), -1)
                if s not in reference:
                    reference[s] = deltas
                ref = reference[s]
                one["cos"] = float(torch.nn.functional.cosine_similarity(deltas, ref).median())
                one["norm"] = float(
                    (deltas.norm(dim=1) / ref.norm(dim=1).clamp_min(1e-30)).median()
                )
                res.add(seed, f"ocd@{s}:{_tag(d)}", one)
                res.add(seed, f"ocd_k@{s}:{_tag(d)}", k)
                log(f"seed {seed}, {_tag(d)}, {s} steps: {one}; OCD({args.draws}) {k}")
        finally:
            base = m.unload()


def denoiser_notes(args: Any, res: Results) -> list[str]:
    """With ``--denoisers``: the share of the base -> overfit-on-test gap in RMSE (or CE) each
    generator's rows took, mean ± sd over seeds (negative: worse than the base)."""
    if not args.denoisers:
        return []
    metric = DOMAINS[args.domain]["metrics"][0].key
    shares = []
    for r in res.rows:
        vals = res.gap(r.key, "base", "overfit", metric) if r.key.startswith("ocd") else []
        if vals:
            shares.append(f"{r.key} {fmt_mean_sd([100 * v for v in vals], '.1f')} %")
    return [f"share of the base -> overfit-on-test gap in {metric}: " + "; ".join(shares)]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = cli.setup(args)
    t0 = time.perf_counter()
    metrics = DOMAINS[args.domain]["metrics"] + [TIME] + (AGREE if args.denoisers else [])
    res = Results(f"sampling-steps-{args.domain}", rows(args), metrics)
    return cli.run_seeds(
        args,
        res,
        lambda seed: run_seed(args, seed, res, workdir),
        lambda: [
            *denoiser_notes(args, res),
            f"settings: the CPU default of benchmarks.{args.domain} (delta={args.delta}, "
            f"{args.fit_steps} fit steps, overfit Adam {args.overfit_lr:g} × 3), one fitted "
            f"generator per seed scored at each step count; deterministic DDIM (eta 0); "
            "overhead: OCD forward / base forward at batch 256, median of paired ratios",
        ],
        module=MODULE,
        argv=argv,
        title=f"Sampling steps ({args.domain}): accuracy and inference cost",
        t0=t0,
    )


if __name__ == "__main__":
    main()
