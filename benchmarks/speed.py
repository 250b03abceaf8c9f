"""Benchmark: speed and memory of ocdwrap against the paper's cost model and naive baselines.

The paper's cost (Lutati & Wolf, ICLR 2023): every training sample is overfitted alone with 3
gradient steps; every test sample takes 10 UNet passes (27 ms each on an RTX 2060). This script
measures, in one run on one machine, with LeNet5 on MNIST and its 120 -> 84 layer (fc2):

1. **Collection**: vectorized :func:`ocdwrap.overfit_batch` (batch 256) against the paper's
   one-sample-at-a-time loop :func:`ocdwrap.overfit_one` (samples/s and their ratio; also with
   the split forward of :mod:`ocdwrap.split` off, i.e. K+1 whole passes per batch), and the
   whole :func:`ocdwrap.collect` (shard writing and rank summary included) as a multiple of one
   epoch of base training (Adam, batch 128) on the same samples, for ``delta="full"`` and
   ``delta="rank1"``.
2. **Inference overhead**: OCD forward / base forward at batch 1 and at a large batch (256; the
   full-matrix UNet path uses ``--full-batch``, 16 on CPU, because one 256-sample forward of the
   UNet takes minutes there), 10 sampling steps, per-sample milliseconds, where the time goes
   (the denoiser passes against the base passes) and, for rank1, the overhead with the split
   forward off (two whole base passes). Hypernetworks come from a short
   :func:`ocdwrap.fit` (timing does not depend on training); extra UNet sizes are built untrained.
   One UNet pass of the paper's size (128 channels, five downsamplings, attention) is timed at
   batch 1 next to the paper's 27 ms.
3. **Fitting**: samples/s of :func:`ocdwrap.fit` for ``full`` and ``rank1``.
4. **Memory**: peak memory of collection and of fitting, each measured in a fresh subprocess
   (CPU: the peak resident set after resetting the kernel's high-water mark, or ``ru_maxrss``
   where that is not possible; CUDA: ``torch.cuda.max_memory_allocated``), and the bytes stored
   per training sample in the shard files on disk, full vs rank1.

Ratios are the result; absolute times are context (they depend on the machine and its load).
Timings are medians over repeats, base and OCD interleaved so load changes hit both. Threads are
pinned with ``--threads`` (default 1, reproducible on a shared machine). About 1-2 minutes on a
2-core CPU (docs/performance.md holds the figures and their reading)::

    python -m benchmarks.speed --json runs/speed.json
    python -m benchmarks.speed --device cuda --json runs/speed_cuda.json
    python -m benchmarks.speed --smoke       # tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import json
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

import ocdwrap
from ocdwrap import split as split_mod
from ocdwrap.hypernet import OCDHyperNetwork

from . import zoo
from .cli import command
from .datasets import load_mnist, tensor_loader
from .results import write_json
from .scoring import CE
from .timing import log, machine, one_epoch_seconds, sync, timed

MODULE = "benchmarks.speed"
# overfit_batch's keyword arguments (a workspace exists from 0.2 on; the benchmark also runs
# against earlier versions of the library)
OVERFIT_PARAMS = set(inspect.signature(ocdwrap.overfit_batch).parameters)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = "fc2"
PAPER_UNET_PASS_MS = 27.0  # the paper's figure, RTX 2060
PAPER_STEPS = 10
# the generators every figure here was measured with, pinned so that a change of OCDConfig's
# defaults never silently changes a published table (the smaller ones are rows of their own)
PINNED_MLP = dict(mlp_hidden=256, cond_dim=128, mlp_layers=3)
PINNED_UNET = (32, 64, 64)
# the library's default sampling steps, at which the inference goal is stated
DEFAULT_STEPS = ocdwrap.SamplingConfig().sampling_steps
# the sampling defaults of every model of base_config: the paper's steps
SAMPLING = ocdwrap.SamplingConfig(sampling_steps=PAPER_STEPS)
# smaller rank-one denoisers timed at the default steps (untrained: timing does not depend on
# the weights): (hidden, cond_dim, blocks)
SMALLER_MLPS = ((128, 128, 3), (128, 64, 2), (64, 64, 2))


# --------------------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    if args.smoke:
        s = dict(
            samples=64,
            batch=16,
            vec_samples=32,
            loop_samples=4,
            big_batch=8,
            full_batch=2,
            fit_steps_rank1=2,
            fit_steps_full=1,
            fit_batch_full=4,
            reps=2,
            collect_reps=1,
            collect_rounds=1,
            paper_unet=False,
            train_epochs=1,
            unet_small=(4,),
            unet_default=(4, 8),
            mlp_hidden=32,
            fit_step_shape=(12, 20),
            fit_step_batch=8,
            fit_step_reps=1,
            fewer_steps=(2,),
            nerf_size=8,
            nerf_samples=4,
            nerf_views=2,
        )
    else:
        s = dict(
            samples=args.samples,
            batch=256,
            vec_samples=2048,
            loop_samples=args.loop_samples,
            big_batch=256,
            full_batch=args.full_batch or (256 if cuda else 16),
            fit_steps_rank1=30,
            fit_steps_full=3,
            fit_batch_full=128 if cuda else 16,
            reps=args.reps,
            collect_reps=3,
            collect_rounds=5,
            paper_unet=not args.no_paper_unet,
            train_epochs=2,
            unet_small=(8, 16),
            unet_default=None,  # OCDConfig's default
            mlp_hidden=None,
            fit_step_shape=(84, 120),  # LeNet5's fc2
            fit_step_batch=128,  # FitArgs' batch_size
            fit_step_reps=1,  # after a warm-up step; each takes 30-90 s on a 2-core CPU
            fewer_steps=(2, 3, 5),
            nerf_size=32,  # benchmarks.nerf's CPU default
            nerf_samples=16,
            nerf_views=25,  # its test views
        )
    s["sampling_steps"] = PAPER_STEPS
    s["memory_one_process"] = bool(args.smoke)
    return s


def base_config(s: dict[str, Any], **kw: Any) -> ocdwrap.OCDConfig:
    """The pinned generators' OCDConfig (``kw`` overrides); its models sample with ``SAMPLING``."""
    extra: dict[str, Any] = dict(PINNED_MLP, unet_channels=PINNED_UNET)
    if s["unet_default"] is not None:
        extra["unet_channels"] = s["unet_default"]
    if s["mlp_hidden"] is not None:
        extra.update(mlp_hidden=s["mlp_hidden"], cond_dim=s["mlp_hidden"])
    extra.update(kw)
    return ocdwrap.OCDConfig(**extra)


# --------------------------------------------------------------------------- timing helpers


def interleaved(
    fns: dict[str, Callable[[], Any]], reps: int, device: str
) -> dict[str, list[float]]:
    """Seconds of each function, run in turn ``reps`` times after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(timed(fn, device)[1])
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the ratios of runs made back to back (robust to load that changes between reps)."""
    return statistics.median(a / b for a, b in zip(num, den))


# --------------------------------------------------------------------------- 1. collection


def bench_collection(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, s: dict[str, Any], device: str, work: str
) -> dict[str, Any]:
    B = s["batch"]
    model = ocdwrap.wrap(
        copy.deepcopy(base).to(device), layer=LAYER, config=base_config(s), sampling=SAMPLING
    )
    xv, yv = x[: s["vec_samples"]].to(device), y[: s["vec_samples"]].to(device)
    batches = [(xv[i : i + B], yv[i : i + B]) for i in range(0, len(yv), B)]
    L = s["loop_samples"]
    xl, yl = x[:L].to(device), y[:L].to(device)

    def vectorized() -> None:
        for b in batches:
            ocdwrap.overfit_batch(model, b[0], b[1], CE)

    def whole_passes() -> None:  # the same without the split forward (K+1 whole passes)
        with split_mod.whole_passes():
            vectorized()

    loop_ref: list[torch.Tensor] = []
    ocdwrap.overfit_batch(model, *batches[0], CE)  # warm-ups
    ocdwrap.overfit_one(model, xl[:2], yl[:2], CE)
    t = interleaved(
        {
            "vectorized": vectorized,
            "whole_passes": whole_passes,
            "loop": lambda: loop_ref.append(ocdwrap.overfit_one(model, xl, yl, CE)),
        },
        s["collect_reps"],
        device,
    )
    n = len(yv)
    vec_delta = torch.cat(
        [
            ocdwrap.overfit_batch(model, xl[i : i + B], yl[i : i + B], CE).delta
            for i in range(0, L, B)
        ]
    )
    out: dict[str, Any] = {
        "layer": LAYER,
        "weight_shape": list(model.weight_shape),
        "batch": B,
        "vectorized_samples": n,
        "vectorized_samples_per_s": n / statistics.median(t["vectorized"]),
        "vectorized_whole_passes_samples_per_s": n / statistics.median(t["whole_passes"]),
        "loop_samples": L,
        "loop_samples_per_s": L / statistics.median(t["loop"]),
        # per round: (n / t_vec) / (L / t_loop), rounds run back to back
        "speedup_vs_loop": paired_ratio(t["loop"], t["vectorized"]) * n / L,
        "speedup_vs_loop_whole_passes": paired_ratio(t["loop"], t["whole_passes"]) * n / L,
        "split_speedup": paired_ratio(t["whole_passes"], t["vectorized"]),
        "rounds": len(t["loop"]),
        "max_abs_diff_vs_loop": float((vec_delta - loop_ref[-1]).abs().max()),
    }

    out.update(
        collect_against_epochs(
            base, x, y, s, device, work, lambda: ocdwrap.overfit_one(model, xl, yl, CE), L
        )
    )
    return out


def prefix_only(model: ocdwrap.OCDModel, x: torch.Tensor, B: int) -> None:
    """The base model up to the target layer on every batch (ocdwrap.split's prefix)."""
    device = model.device
    with torch.no_grad():
        for i in range(0, len(x), B):
            xb = x[i : i + B].to(device)
            split = split_mod.split_for(model, (xb,), {}, lambda xb=xb: model.base_model(xb))
            if split is None:  # not traceable: the whole forward stands in for it
                model.base_model(xb)
            else:
                split.prefix((xb,), {})


def overfit_only(model: ocdwrap.OCDModel, x: torch.Tensor, y: torch.Tensor, B: int) -> None:
    """overfit_batch on every batch, as collect() calls it (one workspace), without the rows
    and the shard writing."""
    workspace: dict = {}
    for i in range(0, len(y), B):
        xb, yb = x[i : i + B].to(model.device), y[i : i + B].to(model.device)
        kw = {"workspace": workspace} if "workspace" in OVERFIT_PARAMS else {}
        if "loss_after" in OVERFIT_PARAMS:  # as collect() calls it (from 0.2.1 on)
            kw["loss_after"] = False
        ocdwrap.overfit_batch(model, xb, yb, CE, **kw)


def collect_against_epochs(
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    s: dict[str, Any],
    device: str,
    work: str,
    loop: Callable[[], Any],
    loop_samples: int,
) -> dict[str, Any]:
    """Whole collect() runs (full and rank1) against one epoch of base training on the same
    samples and against the one-at-a-time loop, in ``collect_rounds`` rounds of
    (epoch, collect rank1, loop, collect full, epoch): each round's ratios are taken within the
    round (the collection over the mean of the two epochs around it; the loop's time per sample
    over the rank1 collection's), and the medians over rounds reported, so load that changes
    between rounds hits numerator and denominator alike. The last round's collections stay
    under ``work`` for the fitting and memory benchmarks."""
    B, N = s["batch"], len(y)
    train_loader = tensor_loader(x, y, 128)
    base_dev = copy.deepcopy(base).to(device)
    one_epoch_seconds(base_dev, train_loader, CE, device)  # warm-up, not counted
    models = {
        delta: ocdwrap.wrap(
            copy.deepcopy(base).to(device),
            layer=LAYER,
            config=base_config(s, delta=delta),
            sampling=SAMPLING,
        )
        for delta in ("full", "rank1")
    }

    def collect(delta: str) -> float:
        d = os.path.join(work, f"collect-{delta}")
        shutil.rmtree(d, ignore_errors=True)
        loader = tensor_loader(x, y, B)
        run = lambda: ocdwrap.collect(models[delta], loader, CE, d, progress=False)  # noqa: E731
        return timed(run, device)[1]

    rounds: list[dict[str, Any]] = []
    for _ in range(s["collect_rounds"]):
        r: dict[str, Any] = {"load_average": os.getloadavg()[0]}
        e0 = one_epoch_seconds(base_dev, train_loader, CE, device)
        r["collect_rank1_seconds"] = collect("rank1")
        # where it goes: the part of the network upstream of the layer alone (run once per
        # sample by any collection), and overfit_batch alone (no rows, no shards)
        r["prefix_seconds"] = timed(lambda: prefix_only(models["rank1"], x, B), device)[1]
        r["overfit_seconds"] = timed(lambda: overfit_only(models["rank1"], x, y, B), device)[1]
        r["loop_seconds"] = timed(loop, device)[1]
        r["collect_full_seconds"] = collect("full")
        e1 = one_epoch_seconds(base_dev, train_loader, CE, device)
        r["epoch_seconds"] = [e0, e1]
        epoch = (e0 + e1) / 2
        for what in ("collect_full", "collect_rank1", "prefix", "overfit"):
            r[f"{what}_epochs"] = r[f"{what}_seconds"] / epoch
        # samples per second of collect(rank1) over samples per second of the loop
        r["collect_rank1_vs_loop"] = (N / r["collect_rank1_seconds"]) / (
            loop_samples / r["loop_seconds"]
        )
        rounds.append(r)
    med = lambda k: statistics.median(r[k] for r in rounds)  # noqa: E731
    out: dict[str, Any] = dict(
        train_samples=N,
        epoch_batch_size=128,
        epoch_seconds=statistics.median(e for r in rounds for e in r["epoch_seconds"]),
        epoch_seconds_all=[e for r in rounds for e in r["epoch_seconds"]],
        collect_rounds=rounds,
        collect_rank1_vs_loop=med("collect_rank1_vs_loop"),
        collect_rank1_vs_loop_range=[
            min(r["collect_rank1_vs_loop"] for r in rounds),
            max(r["collect_rank1_vs_loop"] for r in rounds),
        ],
    )
    for what in ("prefix", "overfit"):
        out[f"{what}_epochs"] = med(f"{what}_epochs")
    for delta in ("full", "rank1"):
        secs = med(f"collect_{delta}_seconds")
        out[f"collect_{delta}_seconds"] = secs
        out[f"collect_{delta}_samples_per_s"] = N / secs
        out[f"collect_{delta}_epochs"] = med(f"collect_{delta}_epochs")
        out[f"collect_{delta}_epochs_range"] = [
            min(r[f"collect_{delta}_epochs"] for r in rounds),
            max(r[f"collect_{delta}_epochs"] for r in rounds),
        ]
    return out


# --------------------------------------------------------------------------- 2. + 3. fit, inference


def fitted(
    base: nn.Module, delta: str, s: dict[str, Any], device: str, work: str
) -> tuple[ocdwrap.OCDModel, dict[str, Any]]:
    cfg = base_config(s, delta=delta)
    m = ocdwrap.wrap(copy.deepcopy(base).to(device), layer=LAYER, config=cfg, sampling=SAMPLING)
    full = delta == "full"
    steps = s["fit_steps_full"] if full else s["fit_steps_rank1"]
    bs = s["fit_batch_full"] if full else ocdwrap.FitArgs().batch_size
    fit_args = ocdwrap.FitArgs(steps=steps, batch_size=bs, checkpoint_every=0)
    report = ocdwrap.fit(m, os.path.join(work, f"collect-{delta}"), fit_args, progress=False)
    info = {
        "samples_per_s": report.samples_per_second,
        "steps": steps,
        "batch_size": bs,
        "seconds": report.seconds,
        "generator_params": sum(p.numel() for p in m.hypernet.net.parameters()),
    }
    return m, info


def untrained(base: nn.Module, cfg: ocdwrap.OCDConfig, dims: tuple, device: str):
    m = ocdwrap.wrap(copy.deepcopy(base).to(device), layer=LAYER, config=cfg, sampling=SAMPLING)
    m.hypernet = (
        OCDHyperNetwork(cfg, kind=m.layer_kind, weight_shape=m.weight_shape, dims=dims)
        .to(device)
        .eval()
    )
    return m


def bench_inference_one(
    m: ocdwrap.OCDModel,
    x: torch.Tensor,
    batches: list[int],
    reps: int,
    device: str,
    whole_passes: bool = False,
    steps: int | None = None,
) -> dict[str, Any]:
    """OCD forward against base forward; ``whole_passes`` also times it with the split off;
    ``steps``: the sampling steps in force (default: the model's sampling defaults)."""
    out: dict[str, Any] = {}
    for B in batches:
        xb = x[:B].to(device)
        # the full UNet beyond batch 1 on CPU takes seconds per call: one timed call each
        # (after the batch-1 warm-up) instead of interleaved repeats
        heavy = m.config.delta == "full" and B > 1 and not device.startswith("cuda")
        r = 1 if heavy else min(reps, 3) if m.config.delta == "full" else reps

        def base_call(xb=xb):
            with m.disable_adapter():
                return m(xb)

        def ocd_call(xb=xb):
            return m(xb)

        def whole_call(xb=xb):
            with split_mod.whole_passes():
                return m(xb)

        with torch.no_grad():
            cond, _ = m.conditioning(xb)

            def gen_call(cond=cond):
                return m.generate(cond)

            fns = {"base": base_call, "ocd": ocd_call, "generation": gen_call}
            if whole_passes:
                fns["whole"] = whole_call
            if heavy:  # the batch-1 run warmed everything up
                t = {k: [timed(fn, device)[1]] for k, fn in fns.items()}
                t["base"] = [statistics.median(timed(base_call, device)[1] for _ in range(5))]
            else:
                t = interleaved(fns, r, device)
        med = {k: statistics.median(v) for k, v in t.items()}
        steps = steps or m.sampling_config.sampling_steps
        row = {
            "base_ms": 1e3 * med["base"],
            "ocd_ms": 1e3 * med["ocd"],
            "overhead": paired_ratio(t["ocd"], t["base"]),
            "base_ms_per_sample": 1e3 * med["base"] / B,
            "ocd_ms_per_sample": 1e3 * med["ocd"] / B,
            # generation: the 10 denoiser passes; base passes: all the rest of the OCD forward
            # (with the split: the prefix once and the suffix twice; else two whole passes)
            "breakdown_ms": {
                "base_passes": 1e3 * max(med["ocd"] - med["generation"], 0.0),
                "generation": 1e3 * med["generation"],
            },
            "denoiser_pass_ms": 1e3 * med["generation"] / steps,
            "denoiser_pass_ms_per_sample": 1e3 * med["generation"] / steps / B,
            "repeats": len(t["ocd"]),
        }
        if whole_passes:
            row["ocd_ms_whole_passes"] = 1e3 * med["whole"]
            row["overhead_whole_passes"] = paired_ratio(t["whole"], t["base"])
        out[str(B)] = row
    return out


def matmul_macs(module: nn.Module, fn: Callable[[], Any]) -> int:
    """Multiply-adds of the Linear and Conv2d layers of ``module`` while ``fn()`` runs (counted
    from the shapes each layer sees: rows x in x out, or output elements x in/groups x kernel)."""
    total = [0]

    def count(layer: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(layer, nn.Linear):
            total[0] += out.numel() * layer.in_features
        else:
            kh, kw = layer.kernel_size
            total[0] += out.numel() * (layer.in_channels // layer.groups) * kh * kw

    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return total[0]


def gemm_gflops(width: int, rows: int, reps: int, device: str) -> float:
    """Achieved GFLOP/s of one Linear of ``width`` x ``width`` on ``rows`` rows (the shape of
    most of the rank-one generator's work), median of ``reps`` timings of 20 calls each."""
    a = torch.randn(rows, width, device=device)
    w = torch.randn(width, width, device=device)

    def call() -> None:
        for _ in range(20):
            torch.nn.functional.linear(a, w)

    call()
    seconds = statistics.median(timed(call, device)[1] for _ in range(reps)) / 20
    return 2 * rows * width * width / seconds / 1e9


def arithmetic_floor(m: ocdwrap.OCDModel, x: torch.Tensor, row: dict[str, Any], gflops: float):
    """What the matrix products alone cost: the generation's and the base forward's multiply-adds
    per sample, and the OCD / base ratio if the generation were nothing but its matrix products
    at ``gflops`` (the rest of the OCD forward as measured in ``row``)."""
    B = x.shape[0]
    with torch.no_grad():
        cond, _ = m.conditioning(x)
    gen = matmul_macs(m.hypernet, lambda: m.generate(cond))
    with m.disable_adapter():
        base = matmul_macs(m.base_model, lambda: m(x))
    floor_ms = 2 * gen / gflops / 1e6
    return {
        "generation_macs_per_sample": gen / B,
        "base_macs_per_sample": base / B,
        "gemm_gflops": gflops,
        "generation_floor_ms": floor_ms,
        "overhead_floor": (row["breakdown_ms"]["base_passes"] + floor_ms) / row["base_ms"],
    }


def unet_pass_ms(cfg: ocdwrap.OCDConfig, dims: tuple, device: str, reps: int) -> dict[str, Any]:
    """One denoiser pass of a UNet of this config at batch 1 (no OCD model around it)."""
    h = OCDHyperNetwork(cfg, kind="linear", weight_shape=(84, 120), dims=dims).to(device).eval()
    net = h.ema
    x = torch.randn(1, 84, 120, device=device)
    c = torch.randn(1, net.net.emb_dim, device=device)
    t = torch.tensor([500], device=device)
    with torch.no_grad():
        ms = 1e3 * statistics.median(
            interleaved({"pass": lambda: net(x, t, c)}, reps, device)["pass"]
        )
    return {
        "channels": list(cfg.unet_channels),
        "attention": cfg.unet_attention,
        "layers_per_block": cfg.unet_layers_per_block,
        "params": sum(p.numel() for p in net.parameters()),
        "padded_shape": list(net.net.padded),
        "pass_ms_batch1": ms,
        "ratio_to_paper_27ms": ms / PAPER_UNET_PASS_MS,
    }


def bench_inference(
    base: nn.Module, x: torch.Tensor, s: dict[str, Any], device: str, work: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    inference: dict[str, Any] = {"sampling_steps": PAPER_STEPS}
    fitting: dict[str, Any] = {}
    models: dict[str, ocdwrap.OCDModel] = {}
    for delta in ("rank1", "full"):
        models[delta], fitting[delta] = fitted(base, delta, s, device, work)
    dims = models["rank1"].hypernet.dims
    reps = s["reps"]
    r1 = models["rank1"]
    inference["rank1"] = {
        "generator": f"MLP denoiser, hidden {r1.config.mlp_hidden}, {r1.config.mlp_layers} blocks",
        **bench_inference_one(r1, x, [1, s["big_batch"]], reps, device, whole_passes=True),
    }
    small = base_config(s, delta="rank1", mlp_hidden=128, cond_dim=128)
    if s["mlp_hidden"] is None:
        inference["rank1_hidden128"] = {
            "generator": "MLP denoiser, hidden 128, 3 blocks (untrained)",
            **bench_inference_one(
                untrained(base, small, dims, device),
                x,
                [1, s["big_batch"]],
                reps,
                device,
                whole_passes=True,
            ),
        }
    big = s["big_batch"]
    gflops = gemm_gflops(PINNED_MLP["mlp_hidden"], big, reps, device)
    inference["gemm_gflops"] = gflops
    for n in s["fewer_steps"]:  # benchmarks.sampling_steps measures what they cost in accuracy
        with r1.sampling(sampling_steps=n):
            inference[f"rank1_{n}_steps"] = {
                "generator": f"the same, {n} sampling steps"
                + (" (the library's default)" if n == DEFAULT_STEPS else ""),
                **bench_inference_one(r1, x, [big], reps, device, steps=n),
            }
            if n == DEFAULT_STEPS:
                row = inference[f"rank1_{n}_steps"]
                row["arithmetic"] = arithmetic_floor(r1, x[:big].to(device), row[str(big)], gflops)
    if s["mlp_hidden"] is None:  # smaller generators at the default steps (untrained)
        for hidden, cond_dim, blocks in SMALLER_MLPS:
            cfg = base_config(
                s, delta="rank1", mlp_hidden=hidden, cond_dim=cond_dim, mlp_layers=blocks
            )
            m = untrained(base, cfg, dims, device)
            with m.sampling(sampling_steps=DEFAULT_STEPS):
                inference[f"smaller_h{hidden}_c{cond_dim}_b{blocks}"] = {
                    "generator": f"MLP denoiser, hidden {hidden}, conditioning {cond_dim}, "
                    f"{blocks} blocks, {DEFAULT_STEPS} sampling steps (untrained)",
                    "params": sum(p.numel() for p in m.hypernet.ema.parameters())
                    + sum(p.numel() for p in m.hypernet.scale.parameters()),
                    **bench_inference_one(m, x, [big], reps, device, steps=DEFAULT_STEPS),
                }
                row = inference[f"smaller_h{hidden}_c{cond_dim}_b{blocks}"]
                row["arithmetic"] = arithmetic_floor(m, x[:big].to(device), row[str(big)], gflops)
    fb = s["full_batch"]
    full = models["full"]
    inference["full"] = {
        "generator": f"UNet2DModel channels {list(full.config.unet_channels)}",
        **bench_inference_one(full, x, [1, fb], reps, device),
    }
    small_cfg = base_config(s, delta="full", unet_channels=s["unet_small"])
    inference["full_small_unet"] = {
        "generator": f"UNet2DModel channels {list(s['unet_small'])} (untrained)",
        **bench_inference_one(untrained(base, small_cfg, dims, device), x, [1, fb], reps, device),
    }
    passes = {
        "default": unet_pass_ms(full.config, dims, device, reps),
        "small": unet_pass_ms(small_cfg, dims, device, reps),
    }
    if s["paper_unet"]:
        passes["paper"] = unet_pass_ms(ocdwrap.OCDConfig.paper(), dims, device, max(1, reps // 2))
    inference["unet_pass"] = passes
    inference["lowrank_render"] = bench_lowrank_render(s, device, work)
    return inference, fitting


def bench_lowrank_render(s: dict[str, Any], device: str, work: str) -> dict[str, Any]:
    """Low-rank OCD on TinyNeRF's fc1 (``benchmarks.nerf``'s CPU default: 32 x 32 views, 16
    depth samples, rank 4): the OCD render of a batch of views against the base render of the
    same views. The generator comes from a short collect and fit on random targets (the time
    does not depend on the weights)."""
    from . import nerf, scenes

    size, samples, views = s["nerf_size"], s["nerf_samples"], s["nerf_views"]
    torch.manual_seed(0)
    base = nerf.TinyNeRF(size, scenes.FOCAL_100 * size / 100, samples=samples).to(device).eval()
    cfg = ocdwrap.OCDConfig(
        **PINNED_MLP,
        delta="lowrank",
        delta_rank=4,
        output_layout="channels_last",
        output_grid=nerf.OUTPUT_GRID,
        overfit_steps=2,
    )
    sampling = ocdwrap.SamplingConfig(task="regression")
    m = ocdwrap.wrap(base, layer="fc1", config=cfg, sampling=sampling)
    poses = scenes.hemisphere_poses(views, seed=0).to(device)
    images = torch.rand(views, size, size, 3, device=device)
    store = ocdwrap.collect(
        m, tensor_loader(poses, images, views), nerf.image_mse, os.path.join(work, "nerf"),
        progress=False,
    )  # fmt: skip
    ocdwrap.fit(m, store, ocdwrap.FitArgs(steps=2, checkpoint_every=0), progress=False)
    out = bench_inference_one(m, poses, [views], s["reps"], device)
    out["generator"] = (
        f"MLP denoiser over rank-{cfg.delta_rank} factors of fc1 (128 x 63); views of "
        f"{size} x {size} px, {samples} depth samples, {sampling.sampling_steps} sampling steps"
    )
    return out


# --------------------------------------------------------------------------- 4. memory


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM), Linux >= 4.0
        return True
    except OSError:
        return False


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r


def child(job: dict[str, Any]) -> dict[str, Any]:
    """One memory measurement, run in a fresh process: collect or fit, peak memory around it."""
    from safetensors.torch import load_file

    torch.set_num_threads(job["threads"])
    device = job["device"]
    s = job["settings"]
    s["unet_default"] = tuple(s["unet_default"]) if s["unet_default"] else None
    data = load_file(job["data"])
    base = zoo.LeNet5()
    base.load_state_dict(load_file(job["base"]))
    base = base.eval().to(device)
    cfg = base_config(s, delta=job["delta"])
    m = ocdwrap.wrap(base, layer=LAYER, config=cfg, sampling=SAMPLING)
    if job["what"] == "collect":

        def run(warm: bool) -> None:
            out = job["out"] + ("-warm" if warm else "")
            shutil.rmtree(out, ignore_errors=True)
            n = s["batch"] if warm else None
            ld = tensor_loader(data["x"], data["y"], s["batch"])
            ocdwrap.collect(m, ld, CE, out, max_samples=n, progress=False)
    else:
        full = job["delta"] == "full"
        steps = s["fit_steps_full"] if full else s["fit_steps_rank1"]
        bs = s["fit_batch_full"] if full else ocdwrap.FitArgs().batch_size

        def run(warm: bool) -> None:
            n = 1 if warm else steps
            fit_args = ocdwrap.FitArgs(steps=n, batch_size=bs, checkpoint_every=0)
            ocdwrap.fit(m, job["store"], fit_args, progress=False)

    cuda = device.startswith("cuda")
    out: dict[str, Any] = {}
    # the first call pays one-time costs (lazy imports, kernel and allocator set-up): measured on
    # its own; the figure that scales with the work is the second, full-size call's
    for warm in (True, False):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda0 = torch.cuda.memory_allocated()
        reset = _reset_peak()
        rss0 = _status_kb("VmRSS") or 0
        maxrss0 = _maxrss_kb()
        run(warm)
        prefix = "first_call_" if warm else ""
        if cuda:
            torch.cuda.synchronize()
            out[prefix + "cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - cuda0) / 2**20
        hwm = _status_kb("VmHWM") if reset else None
        if hwm is not None:
            out[prefix + "host_peak_mb"] = (hwm - rss0) / 1024
            out["host_method"] = "VmHWM after clear_refs, minus VmRSS before"
        else:  # ru_maxrss cannot be reset: a lower bound when the setup peaked higher
            out[prefix + "host_peak_mb"] = max(0, _maxrss_kb() - max(rss0, maxrss0)) / 1024
            out["host_method"] = "ru_maxrss delta (a lower bound)"
        if not warm:
            out["host_rss_before_mb"] = rss0 / 1024
    return out


def run_child(
    jobs: list[dict[str, Any]], work: str, tree: str = ROOT, tag: str = ""
) -> list[dict[str, Any]]:
    """Run memory measurements in one fresh Python process (in order) and return their results.

    ``tree``: the source tree whose ``ocdwrap`` and ``benchmarks`` the process runs (another
    checkout, for an A/B of two versions: ``--memory-ab``)."""
    name = "+".join(f"{j['what']}-{j['delta']}" for j in jobs) + tag
    path = os.path.join(work, f"job-{name}.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    threads = str(jobs[0]["threads"])
    pythonpath = os.pathsep.join(p for p in (tree, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONPATH=pythonpath)
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, "--_child", path],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def safetensors_bytes(path: str) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, read from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {
        k: v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    }


def stored_bytes(directory: str) -> dict[str, Any]:
    store = ocdwrap.DeltaStore(directory)
    per_key: dict[str, int] = {}
    files = 0
    for p in store.shard_paths():
        files += os.path.getsize(p)
        for k, b in safetensors_bytes(p).items():
            per_key[k] = per_key.get(k, 0) + b
    n = len(store)
    return {
        "samples": n,
        "file_bytes_per_sample": files / n,
        "per_key_bytes_per_sample": {k: v / n for k, v in sorted(per_key.items())},
    }


def bench_memory(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, s: dict[str, Any], args, work: str
) -> dict[str, Any]:
    from safetensors.torch import save_file

    data_path, base_path = (
        os.path.join(work, "data.safetensors"),
        os.path.join(work, "base.safetensors"),
    )
    save_file({"x": x.contiguous(), "y": y.contiguous()}, data_path)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, base_path)
    job_base = dict(
        threads=args.threads,
        device=args.device,
        data=data_path,
        base=base_path,
        settings={
            **s,
            "unet_default": list(s["unet_default"]) if s["unet_default"] else None,
            "unet_small": list(s["unet_small"]),
        },
    )
    jobs = {
        f"collect_{delta}": dict(
            job_base, what="collect", delta=delta, out=os.path.join(work, f"mem-collect-{delta}")
        )
        for delta in ("full", "rank1")
    }
    for delta in ("full", "rank1"):
        jobs[f"fit_{delta}"] = dict(
            job_base, what="fit", delta=delta, store=os.path.join(work, f"collect-{delta}")
        )
    out: dict[str, Any] = {"samples": len(y)}
    if s["memory_one_process"]:  # --smoke: one process for all four, to save interpreter starts
        out.update(zip(jobs, run_child(list(jobs.values()), work)))
    else:  # one fresh process per measurement; peaks are per process, so they may run in parallel
        with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
            done = {k: pool.submit(run_child, [job], work) for k, job in jobs.items()}
            out.update({k: f.result()[0] for k, f in done.items()})
    full, r1 = (
        stored_bytes(os.path.join(work, "collect-full")),
        stored_bytes(os.path.join(work, "collect-rank1")),
    )
    fk, rk = full["per_key_bytes_per_sample"], r1["per_key_bytes_per_sample"]
    out["stored"] = {
        "full": full,
        "rank1": r1,
        "delta_bytes_per_sample_full": fk["delta"],
        "delta_bytes_per_sample_rank1": rk["u"] + rk["v"],
        "delta_ratio_full_to_rank1": fk["delta"] / (rk["u"] + rk["v"]),
        "file_ratio_full_to_rank1": full["file_bytes_per_sample"] / r1["file_bytes_per_sample"],
    }
    return out


def memory_ab(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """Peak memory of ``fit()`` on the full path (the figure that read 478 -> 622 MB between two
    runs) in fresh processes, alternating between source trees (``--memory-ab LABEL=PATH ...``),
    ``--memory-ab-runs`` processes each, one at a time. The base, the data and one 4,096-sample
    full collection (made with the first tree's code) are shared by every process."""
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    trees = dict(t.split("=", 1) for t in args.memory_ab)
    trees = {k: os.path.abspath(v) for k, v in trees.items()}
    s = settings(args)
    work = args.workdir or tempfile.mkdtemp(prefix="ocdwrap-memab-")
    os.makedirs(work, exist_ok=True)
    start, load0 = time.perf_counter(), os.getloadavg()
    d = load_mnist(seed=args.seed)
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(d["train"][1]), generator=g)[: s["samples"]]
    x, y = d["train"][0][idx].contiguous(), d["train"][1][idx].contiguous()
    torch.manual_seed(args.seed)
    base = zoo.LeNet5()
    zoo.train_base(
        base, tensor_loader(x, y, 128), tensor_loader(d["val"][0][:2000], d["val"][1][:2000], 1000),
        CE, max_epochs=s["train_epochs"], device="cpu", seed=args.seed, progress=False,
    )  # fmt: skip
    data_path, base_path = (
        os.path.join(work, "data.safetensors"),
        os.path.join(work, "base.safetensors"),
    )
    save_file({"x": x, "y": y}, data_path)
    save_file({k: v.contiguous() for k, v in base.eval().state_dict().items()}, base_path)
    job = dict(threads=args.threads, device="cpu", data=data_path, base=base_path, delta="full")
    job["settings"] = {**s, "unet_default": None, "unet_small": list(s["unet_small"])}
    store = os.path.join(work, "collect-full")
    first = next(iter(trees.values()))
    run_child([dict(job, what="collect", out=store)], work, first, "-store")
    out: dict[str, Any] = {k: {"tree": v, "host_peak_mb": [], "first_call_host_peak_mb": []}
                           for k, v in trees.items()}  # fmt: skip
    for i in range(args.memory_ab_runs):
        for label, tree in trees.items():
            r = run_child([dict(job, what="fit", store=store)], work, tree, f"-{label}-{i}")[0]
            out[label]["host_peak_mb"].append(r["host_peak_mb"])
            out[label]["first_call_host_peak_mb"].append(r["first_call_host_peak_mb"])
            log(f"fit full, {label}, process {i + 1}: {r['host_peak_mb']:.0f} MB")
    for v in out.values():
        v["median_mb"] = statistics.median(v["host_peak_mb"])
        v["range_mb"] = [min(v["host_peak_mb"]), max(v["host_peak_mb"])]
    results = {
        "command": command(MODULE, argv),
        "date": datetime.date.today().isoformat(),
        "machine": machine("cpu"),
        "threads": args.threads,
        "torch": torch.__version__,
        "load_average_start": list(load0),
        "load_average_end": list(os.getloadavg()),
        "what": "peak resident memory of ocdwrap.fit(delta='full') above the process's level "
        f"before the call (VmHWM after clear_refs), {s['fit_steps_full']} steps of batch "
        f"{s['fit_batch_full']} on a {s['samples']}-sample LeNet5 fc2 collection, after a "
        "1-step first call; one fresh process each, trees alternating",
        "memory_ab": out,
        "seconds": time.perf_counter() - start,
    }
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    for label, v in out.items():
        print(
            f"{label}: median {v['median_mb']:.0f} MB, runs {[round(m) for m in v['host_peak_mb']]}"
        )
    if args.json:
        write_json(args.json, results, indent=2)
    return results


# --------------------------------------------------------------------------- docs/performance.md

DOC_START = "<!-- speed-doc: "
DOC_END = "<!-- /speed-doc -->"


def _verdict(value: float, target: float, at_most: bool) -> str:
    """'met (x% margin)' or 'missed by x (y%)' for ``value`` against ``target``."""
    gap = (target - value) if at_most else (value - target)
    rel = 100 * gap / target
    if gap >= 0:
        return f"met, {rel:.0f} % margin"
    return f"**missed** by {-gap:.2f} ({-rel:.0f} %)"


def _collect_cells(c: dict[str, Any], key: str) -> str:
    """The median and, where the run had rounds, their range."""
    rng = c.get(f"{key}_range")
    return f"{c[key]:.2f}" + (f" [{rng[0]:.2f}-{rng[1]:.2f}]" if rng else "")


def _vs_loop(c: dict[str, Any]) -> float:
    if "collect_rank1_vs_loop" in c:
        return c["collect_rank1_vs_loop"]
    return c["train_samples"] / c["collect_rank1_seconds"] / c["loop_samples_per_s"]


def doc_tables(before_path: str, after_path: str, memory_ab_path: str | None = None) -> str:
    """The goals table (before -> after) and the detail tables of docs/performance.md, rendered
    from the committed JSONs (``--update-doc`` writes them between the ``speed-doc`` markers;
    tests/test_speed_doc.py checks the page matches)."""
    root = ROOT
    with open(os.path.join(root, before_path)) as f:
        b = json.load(f)
    with open(os.path.join(root, after_path)) as f:
        a = json.load(f)
    big = str(a["settings"]["big_batch"])
    step_key = f"rank1_{DEFAULT_STEPS}_steps"
    cb, ca = b["collection"], a["collection"]
    ob, oa = b["inference"][step_key][big]["overhead"], a["inference"][step_key][big]["overhead"]
    lb, la = _vs_loop(cb), _vs_loop(ca)
    loads = (
        f"load average {b['load_average_start'][0]:.1f} -> {b['load_average_end'][0]:.1f} (before), "
        f"{a['load_average_start'][0]:.1f} -> {a['load_average_end'][0]:.1f} (after)"
    )
    lines = [
        f"Before: `{before_path}`; after: `{after_path}` ({a['machine']}, {a['threads']} thread, "
        f"torch {a['torch']}; {loads}). Each ratio is taken within its run.",
        "",
        "| goal (issue 26) | target | before | after | after vs target |",
        "| --- | --- | --- | --- | --- |",
        f"| `collect()` of rank-one deltas, in epochs of base training (median [range] over "
        f"{len(ca.get('collect_rounds', [])) or 1} rounds) | ≤ 1 (stretch 0.5) | "
        f"{_collect_cells(cb, 'collect_rank1_epochs')} | "
        f"{_collect_cells(ca, 'collect_rank1_epochs')} | "
        f"{_verdict(ca['collect_rank1_epochs'], 1.0, True)}; stretch "
        f"{_verdict(ca['collect_rank1_epochs'], 0.5, True)} |",
        f"| `collect()` of rank-one deltas / the one-at-a-time loop, samples per second | ≥ 20x | "
        f"{lb:.1f}x | {la:.1f}x"
        + (
            f" [{ca['collect_rank1_vs_loop_range'][0]:.1f}-{ca['collect_rank1_vs_loop_range'][1]:.1f}]"
            if "collect_rank1_vs_loop_range" in ca
            else ""
        )
        + f" | {_verdict(la, 20.0, False)} |",
        f"| rank-one OCD forward / base forward, batch {big}, {DEFAULT_STEPS} sampling steps "
        f"(the default generator, hidden {PINNED_MLP['mlp_hidden']}) | ≤ 1.5x | {ob:.2f}x | "
        f"{oa:.2f}x | {_verdict(oa, 1.5, True)} |",
        "",
        "| other figures (issue 17's goals) | goal | before | after |",
        "| --- | --- | --- | --- |",
        f"| vectorized overfit / one-at-a-time loop | ≥ 20x | {cb['speedup_vs_loop']:.1f}x | "
        f"{ca['speedup_vs_loop']:.1f}x |",
        f"| `collect()` with full matrices, epochs | ≤ 3 | "
        f"{_collect_cells(cb, 'collect_full_epochs')} | "
        f"{_collect_cells(ca, 'collect_full_epochs')} |",
        f"| low-rank TinyNeRF render / base render | ≤ 2x | "
        f"{b['inference']['lowrank_render'][str(b['settings']['nerf_views'])]['overhead']:.2f}x | "
        f"{a['inference']['lowrank_render'][str(a['settings']['nerf_views'])]['overhead']:.2f}x |",
        "| full-path fit step, micro-batched / one pass, CPU time | ≥ 3x | "
        + " | ".join(
            f"{r['fit_step']['cpu_speedup']:.2f}x" if r.get("fit_step") else "not measured"
            for r in (b, a)
        )
        + " |",
        "| peak memory above the start, MB: `fit` full / `collect` full / `collect` rank one | — | "
        + " | ".join(
            " / ".join(
                f"{r['memory'][k]['host_peak_mb']:.0f}"
                for k in ("fit_full", "collect_full", "collect_rank1")
            )
            for r in (b, a)
        )
        + " |",
    ]
    inf = a["inference"]
    lines += [
        "",
        f"Inference at batch {big} in the after run (OCD forward / base forward, median of "
        f"{inf[step_key][big]['repeats']} paired repeats; generators other than the default "
        "untrained: the time does not depend on the weights):",
        "",
        "| generator | sampling steps | OCD / base | denoiser pass, ms | base passes / generation, ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    rows = [("rank1", PAPER_STEPS)] + [
        (f"rank1_{n}_steps", n) for n in a["settings"]["fewer_steps"]
    ]
    rows += [(k, DEFAULT_STEPS) for k in inf if k.startswith("smaller_")]
    labels = {key: _generator_label(inf, key) for key, _ in rows}
    for key, steps in rows:
        v = inf[key][big]
        lines.append(
            f"| {labels[key]} | {steps} | {v['overhead']:.2f}x | {v['denoiser_pass_ms']:.2f} | "
            f"{v['breakdown_ms']['base_passes']:.1f} / {v['breakdown_ms']['generation']:.1f} |"
        )
    floors = [(k, inf[k]) for k, _ in rows if "arithmetic" in inf[k]]
    if floors:  # runs before the arithmetic was recorded have none
        gf = inf["gemm_gflops"]
        lines += [
            "",
            f"What the matrix products alone cost (after run): a {PINNED_MLP['mlp_hidden']}-wide "
            f"Linear on {big} rows runs at {gf:.0f} GFLOP/s on this CPU; at that speed, a "
            "generation that were nothing but its matrix products (no normalisation, activation, "
            "noise or copy) would take the floor below, and the OCD forward the floor ratio "
            "(the base passes as measured):",
            "",
            "| generator | multiply-adds per sample: generation / base forward | generation "
            "floor, ms (measured) | OCD / base: floor (measured) |",
            "| --- | --- | --- | --- |",
        ]
        for key, v in floors:
            ar, row = v["arithmetic"], v[big]
            lines.append(
                f"| {labels[key]} | {ar['generation_macs_per_sample'] / 1e6:.2f} M / "
                f"{ar['base_macs_per_sample'] / 1e6:.2f} M | {ar['generation_floor_ms']:.1f} "
                f"({row['breakdown_ms']['generation']:.1f}) | {ar['overhead_floor']:.2f}x "
                f"({row['overhead']:.2f}x) |"
            )
    if "compile" in a:
        cc = a["compile"]
        lines += [
            "",
            f"`torch.compile` (inductor), after run: the rank-one denoiser pass at batch "
            f"{cc['batch']} {cc['eager_ms']:.2f} ms eager, {cc['compiled_ms']:.2f} ms compiled "
            f"({cc['speedup']:.2f}x; {cc['compile_seconds']:.0f} s to compile).",
        ]
        cm = cc.get("model", {})
        if cm.get("compiles"):
            lines[-1] += (
                f" The whole wrapped model compiles (`torch.compile(model)`, graph breaks "
                f"included): OCD / base forward {cm['eager_overhead']:.2f}x eager, "
                f"{cm['compiled_overhead']:.2f}x compiled ({cm['speedup']:.2f}x; outputs equal to "
                f"{cm['max_abs_diff_vs_eager']:.0e}; {cm['compile_seconds']:.0f} s to compile)."
            )
        elif cm:
            lines[-1] += f" The wrapped model did not compile: {cm['error']}"
    lines += ["", *detail_tables(a, after_path)]
    if a.get("fit_step"):
        lines += fit_step_table(a["fit_step"], "after run")
    elif b.get("fit_step"):
        lines += fit_step_table(b["fit_step"], f"before run (`{before_path}`)")
    if memory_ab_path:
        with open(os.path.join(root, memory_ab_path)) as f:
            m = json.load(f)
        lines += [
            "",
            f"Peak memory of `fit` on the full path, A/B in fresh processes (`{memory_ab_path}`, "
            f"`{m['command']}`; load average {m['load_average_start'][0]:.1f}):",
            "",
            "| code | processes | peak above the start, MB (each process) | median |",
            "| --- | --- | --- | --- |",
        ]
        for label, v in m["memory_ab"].items():
            runs = ", ".join(f"{x:.0f}" for x in v["host_peak_mb"])
            lines.append(f"| {label} | {len(v['host_peak_mb'])} | {runs} | {v['median_mb']:.0f} |")
    return "\n".join(lines)


def _generator_label(inf: dict[str, Any], key: str) -> str:
    """The generator of inference row ``key`` as the doc's tables name it (the default's rows
    by the default generator, the others without their "untrained" remark)."""
    gen = inf["rank1" if key.startswith("rank1") else key]["generator"]
    return gen.split(", untrained")[0].split(" (untrained)")[0]


def detail_tables(a: dict[str, Any], path: str) -> list[str]:
    """The after run's figures against the paper's cost model: collection, inference at batch 1
    and on the full path, the paper-size UNet pass, fitting, the full-path fit step, memory."""
    c, inf, fit, mem = a["collection"], a["inference"], a["fitting"], a["memory"]
    paper = a["paper_cost_model"]
    out = [
        f"The after run's other figures (`{path}`):",
        "",
        "| figure | paper's protocol | ocdwrap |",
        "| --- | --- | --- |",
        f"| overfitting, per training sample | {paper['overfit_steps_per_sample']} steps, one "
        f"sample at a time | vectorized batch of {c['batch']}: "
        f"{c['vectorized_samples_per_s']:,.0f} samples/s, {c['speedup_vs_loop']:.1f}x the "
        f"one-at-a-time loop ({c['loop_samples_per_s']:,.0f}/s; "
        f"{c['speedup_vs_loop_whole_passes']:.1f}x with the split forward off); deltas equal the "
        f"loop's to {c['max_abs_diff_vs_loop']:.1e} |",
        f"| whole collection (`collect()` of {c['train_samples']:,} samples, shards included) | "
        f"— | rank one {c['collect_rank1_seconds']:.2f} s, full matrices "
        f"{c['collect_full_seconds']:.2f} s; one epoch of base training {c['epoch_seconds']:.2f} s |",
    ]
    for key, label in (("rank1", "rank-one generator"), ("full", "full-matrix UNet")):
        steps = PAPER_STEPS
        for B, v in inf[key].items():
            if not isinstance(v, dict):
                continue
            out.append(
                f"| inference, batch {B}, {steps} sampling steps | {paper['unet_passes_per_test_sample']} "
                f"UNet passes x {paper['unet_pass_ms']:.0f} ms ({paper['gpu']}) | {label}: "
                f"{v['overhead']:,.1f}x the base forward, {v['ocd_ms_per_sample']:.3f} ms per "
                f"sample, denoiser pass {v['denoiser_pass_ms']:.2f} ms |"
            )
    for v in inf["unet_pass"].values():
        out.append(
            f"| one UNet pass at batch 1, channels {v['channels']} ({v['params'] / 1e6:.2f} M "
            f"params) | {paper['unet_pass_ms']:.0f} ms (the paper's UNet) | {v['pass_ms_batch1']:.1f} ms |"
        )
    for k, v in fit.items():
        out.append(
            f"| fitting, `delta={k!r}` | — | {v['samples_per_s']:,.1f} samples/s (batch "
            f"{v['batch_size']}, {v['steps']} steps) |"
        )
    if mem:
        st = mem["stored"]
        out.append(
            f"| stored per training sample | the full matrix | rank one: "
            f"{st['delta_bytes_per_sample_rank1']:.0f} B of factors against "
            f"{st['delta_bytes_per_sample_full']:.0f} B "
            f"({st['delta_ratio_full_to_rank1']:.0f}x less); whole shards "
            f"{st['rank1']['file_bytes_per_sample']:,.0f} against "
            f"{st['full']['file_bytes_per_sample']:,.0f} B |"
        )
        for k in ("collect_full", "collect_rank1", "fit_full", "fit_rank1"):
            if k in mem:
                what, delta = k.split("_")
                out.append(
                    f"| peak memory above the start, `{what}`, `delta={delta!r}` | — | "
                    f"{mem[k]['host_peak_mb']:.0f} MB (first, small call in the same fresh "
                    f"process: {mem[k]['first_call_host_peak_mb']:.0f} MB) |"
                )
    return out


def fit_step_table(fs: dict[str, Any], run: str) -> list[str]:
    """The full-path fit step measured four ways (``fit_step`` of a run's JSON)."""
    out: list[str] = []
    if "micro_batched" in fs:
        out += [
            "",
            f"One `fit` step of the full path at the library's defaults ({fs['weight_shape'][0]} x "
            f"{fs['weight_shape'][1]}, batch {fs['batch']}, UNet {tuple(fs['unet_channels'])}), "
            f"{run}:",
            "",
            "| how | micro-batch | s/step (wall) | user s | kernel s | kernel share | minor faults |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *(
                f"| {label.replace('_', ' ')} | {v['micro_batch']} | {v['seconds_per_step']:.2f} | "
                f"{v['user_s']:.2f} | {v['kernel_s']:.2f} | {100 * v['kernel_share']:.0f} % | "
                f"{v['minor_faults_per_step']:,.0f} |"
                for label, v in _fit_step_variants(fs)
            ),
        ]
    return out


def collect_ab_table(paths: list[str]) -> str:
    """``--collection-only`` runs of two versions, alternating (``LABEL=PATH`` each): every
    run's medians, then each version's median over its runs."""
    rows: list[str] = []
    by_version: dict[str, list[dict[str, Any]]] = {}
    for item in paths:
        label, path = item.split("=", 1)
        with open(os.path.join(ROOT, path)) as f:
            c = json.load(f)
        by_version.setdefault(label, []).append(c["collection"])
        col = c["collection"]
        rows.append(
            f"| {label} | `{path}` | {c['load_average_start'][0]:.1f} | "
            f"{col['prefix_epochs']:.2f} | {col['overfit_epochs']:.2f} | "
            f"{_collect_cells(col, 'collect_rank1_epochs')} | {col['collect_rank1_vs_loop']:.1f}x | "
            f"{col['speedup_vs_loop']:.1f}x |"
        )
    lines = [
        "| version | run | load average at start | prefix alone, epochs | `overfit_batch` alone, "
        "epochs | `collect()` rank one, epochs (median [range] of the rounds) | `collect()` / "
        "loop | vectorized overfit / loop |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]
    keys = ("prefix_epochs", "overfit_epochs", "collect_rank1_epochs", "collect_rank1_vs_loop")
    for label, cols in by_version.items():
        m = {k: statistics.median(c[k] for c in cols) for k in keys}
        lines.append(
            f"| **{label}, median of the {len(cols)} runs** | | | {m['prefix_epochs']:.2f} | "
            f"{m['overfit_epochs']:.2f} | **{m['collect_rank1_epochs']:.2f}** | "
            f"**{m['collect_rank1_vs_loop']:.1f}x** | |"
        )
    return "\n".join(lines)


def update_doc(doc: str) -> int:
    """Re-render every ``<!-- speed-doc: BEFORE AFTER [MEMORY_AB] -->`` block of ``doc`` (and
    ``<!-- speed-doc: collect-ab LABEL=PATH ... -->``: :func:`collect_ab_table`)."""
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
            paths = line[len(DOC_START) :].split("-->")[0].split()
            if paths[0] == "collect-ab":
                out += ["", collect_ab_table(paths[1:]), ""]
            else:
                out += ["", doc_tables(*paths), ""]
            count += 1
            skipping = True
    if skipping:
        raise ValueError(f"{doc}: a speed-doc block is not closed with {DOC_END}")
    with open(doc, "w") as f:
        f.write("\n".join(out))
    return count


# --------------------------------------------------------------------------- report


def goals(r: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    c, inf = r["collection"], r["inference"]
    big = str(s["big_batch"])
    out = {
        "vectorized_vs_loop_at_least_20x": c["speedup_vs_loop"] >= 20,
        "collect_rank1_end_to_end_vs_loop_at_least_20x": c["collect_rank1_vs_loop"] >= 20,
        "collect_rank1_at_most_1_epoch": c["collect_rank1_epochs"] <= 1,
        "collect_full_at_most_3_epochs": c["collect_full_epochs"] <= 3,
    }
    # the library's default sampling steps (the goal), and each other count measured
    default = f"rank1_{DEFAULT_STEPS}_steps"
    for k, v in inf.items():
        if k == "rank1" or (k.startswith("rank1_") and k.endswith("_steps")):
            name = f"{k}_default" if k == default else k
            out[f"{name}_overhead_at_most_2x_at_batch_{big}"] = v[big]["overhead"] <= 2
            if k == default:  # issue 26's goal
                out[f"{name}_overhead_at_most_1.5x_at_batch_{big}"] = v[big]["overhead"] <= 1.5
    if "lowrank_render" in inf:
        out["lowrank_render_at_most_2x_the_base_render"] = all(
            v["overhead"] <= 2 for k, v in inf["lowrank_render"].items() if k != "generator"
        )
    fs = r.get("fit_step", {})
    if "micro_batched" in fs:
        out["fit_step_full_micro_batched_at_least_3x_less_cpu_time"] = fs["cpu_speedup"] >= 3
    return out


def render(r: dict[str, Any]) -> str:
    c, inf, fit, mem = r["collection"], r["inference"], r["fitting"], r["memory"]
    lines = [
        f"# ocdwrap speed ({r['machine']}; device {r['device']}; {r['threads']} thread(s))",
        "",
        f"## Collection (LeNet5 {c['layer']} {c['weight_shape'][1]}->{c['weight_shape'][0]})",
        f"vectorized, batch {c['batch']}: {c['vectorized_samples_per_s']:.0f} samples/s "
        f"({c['vectorized_whole_passes_samples_per_s']:.0f} with whole passes, split off); "
        f"one-at-a-time loop: {c['loop_samples_per_s']:.0f} samples/s",
        f"  ratio to the loop: {c['speedup_vs_loop']:.1f}x "
        f"({c['speedup_vs_loop_whole_passes']:.1f}x with whole passes); "
        f"max |delta - loop delta| {c['max_abs_diff_vs_loop']:.1e}",
        f"collect() of {c['train_samples']} samples, in epochs of base training "
        f"(one epoch = {c['epoch_seconds']:.2f} s): delta=full {c['collect_full_epochs']:.2f} "
        f"({c['collect_full_seconds']:.1f} s), delta=rank1 {c['collect_rank1_epochs']:.2f} "
        f"({c['collect_rank1_seconds']:.1f} s)",
        f"  medians of {len(c['collect_rounds'])} rounds; rank1 [range "
        f"{c['collect_rank1_epochs_range'][0]:.2f}-{c['collect_rank1_epochs_range'][1]:.2f}]; "
        f"collect(rank1) / the loop, samples per second: {c['collect_rank1_vs_loop']:.1f}x "
        f"[{c['collect_rank1_vs_loop_range'][0]:.1f}-{c['collect_rank1_vs_loop_range'][1]:.1f}]",
        "",
        f"## Inference ({inf['sampling_steps']} sampling steps): OCD forward / base forward",
        "| generator | batch | overhead | split off | OCD ms/sample | base ms/sample "
        "| denoiser pass ms | base passes / generation ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = ["rank1", *(k for k in inf if k.startswith("rank1_") and k.endswith("_steps"))]
    smaller = [k for k in inf if k.startswith("smaller_")]
    for key in (*keys, "rank1_hidden128", *smaller, "full", "full_small_unet", "lowrank_render"):
        if key not in inf:
            continue
        for B, v in inf[key].items():
            if not isinstance(v, dict) or not B.isdigit():
                continue
            b = v["breakdown_ms"]
            whole = f"{v['overhead_whole_passes']:.1f}x" if "overhead_whole_passes" in v else "-"
            lines.append(
                f"| {key}: {inf[key]['generator']} | {B} | {v['overhead']:.1f}x | {whole} | "
                f"{v['ocd_ms_per_sample']:.3f} | {v['base_ms_per_sample']:.4f} | "
                f"{v['denoiser_pass_ms']:.2f} | {b['base_passes']:.1f} / {b['generation']:.1f} |"
            )
    if "gemm_gflops" in inf:
        lines += ["", f"A {PINNED_MLP['mlp_hidden']}-wide Linear: {inf['gemm_gflops']:.0f} GFLOP/s"]
        for key in (*keys, *smaller):
            ar = inf[key].get("arithmetic")
            if ar:
                lines.append(
                    f"  {key}: {ar['generation_macs_per_sample'] / 1e6:.2f} M multiply-adds per "
                    f"sample (base {ar['base_macs_per_sample'] / 1e6:.2f} M); matrix products "
                    f"alone {ar['generation_floor_ms']:.1f} ms, OCD / base {ar['overhead_floor']:.2f}x"
                )
    lines += ["", "UNet pass at batch 1 (the paper: 27 ms on an RTX 2060):"]
    for k, v in inf["unet_pass"].items():
        lines.append(
            f"  {k}: channels {v['channels']}, {v['params'] / 1e6:.2f} M params: "
            f"{v['pass_ms_batch1']:.1f} ms ({v['ratio_to_paper_27ms']:.2f}x the paper's)"
        )
    if "compile" in r:
        cc = r["compile"]
        lines += [
            "",
            f"torch.compile of the rank1 denoiser (batch {cc['batch']}): eager {cc['eager_ms']:.2f} ms, "
            f"compiled {cc['compiled_ms']:.2f} ms per pass ({cc['speedup']:.2f}x), "
            f"compile time {cc['compile_seconds']:.0f} s",
        ]
        cm = cc.get("model", {})
        if cm.get("compiles"):
            lines.append(
                f"torch.compile of the wrapped model ({cm['sampling_steps']} steps): OCD / base "
                f"forward {cm['eager_overhead']:.2f}x eager, {cm['compiled_overhead']:.2f}x "
                f"compiled ({cm['speedup']:.2f}x); max |compiled - eager| "
                f"{cm['max_abs_diff_vs_eager']:.1e}; compile time {cm['compile_seconds']:.0f} s"
            )
        elif cm:
            lines.append(f"torch.compile of the wrapped model failed: {cm['error']}")
    if r.get("fit_step"):
        fs = r["fit_step"]
        lines += [
            "",
            f"## One fit step, full path, library defaults ({fs['weight_shape'][0]} x "
            f"{fs['weight_shape'][1]} layer, batch {fs['batch']}, UNet {fs['unet_channels']})",
            "| how | micro-batch | s/step | user s | kernel s | kernel share | minor faults |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *(
                f"| {label} | {v['micro_batch']} | {v['seconds_per_step']:.2f} | {v['user_s']:.2f} | "
                f"{v['kernel_s']:.2f} | {100 * v['kernel_share']:.0f} % | "
                f"{v['minor_faults_per_step']:,.0f} |"
                for label, v in _fit_step_variants(fs)
            ),
            f"micro-batched / one pass: {fs['speedup']:.2f}x faster in wall time, "
            f"{fs['cpu_speedup']:.2f}x in CPU time (user + kernel; on a shared machine the "
            "wall time also counts waiting for a core)",
        ]
        if "jemalloc" in fs:
            lines.append(
                f"with jemalloc ({fs['jemalloc']['malloc_conf']}): one pass / glibc one pass "
                f"{_cpu(fs['jemalloc']['one_pass']) / _cpu(fs['one_pass']):.2f}x the CPU time, "
                f"micro-batched / glibc micro-batched "
                f"{_cpu(fs['jemalloc']['micro_batched']) / _cpu(fs['micro_batched']):.2f}x"
            )
    lines += [
        "",
        "## Fitting",
        *(
            f"{k}: {v['samples_per_s']:.1f} samples/s (batch {v['batch_size']}, {v['steps']} steps)"
            for k, v in fit.items()
        ),
    ]
    if mem:
        st = mem["stored"]
        lines += [
            "",
            "## Memory (peak above the process's resident set before the call)",
            *(
                f"{k}: {v['host_peak_mb']:.0f} MB host"
                + (f", {v['cuda_peak_mb']:.0f} MB CUDA" if "cuda_peak_mb" in v else "")
                + f" (first call in a fresh process: {v['first_call_host_peak_mb']:.0f} MB)"
                for k, v in mem.items()
                if k.startswith(("collect_", "fit_"))
            ),
            f"stored delta per training sample: full {st['delta_bytes_per_sample_full']:.0f} B, "
            f"rank1 {st['delta_bytes_per_sample_rank1']:.0f} B ({st['delta_ratio_full_to_rank1']:.1f}x); "
            f"whole shard files {st['full']['file_bytes_per_sample']:.0f} vs "
            f"{st['rank1']['file_bytes_per_sample']:.0f} B/sample",
        ]
    if r.get("integrity"):
        from .integrity import render as integrity_table

        lines += [
            "",
            "## Checking checksums (share of fit's data loading; goal under 10 %)",
            integrity_table({"results": r["integrity"], "hash_gb_per_s": {}}).split("\n\n")[0],
        ]
    lines += ["", "## Goals", *(f"{k}: {'yes' if v else 'no'}" for k, v in r["goals"].items())]
    return "\n".join(lines)


def _cpu(v: dict[str, Any]) -> float:
    return v["user_s"] + v["kernel_s"]


def _fit_step_variants(fs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, measurement) of every way the fit step was run, glibc first, then jemalloc."""
    out = [(k, v) for k, v in fs.items() if isinstance(v, dict) and "micro_batch" in v]
    for k, v in fs.get("jemalloc", {}).items():
        if isinstance(v, dict) and "micro_batch" in v:
            out.append((f"{k}, jemalloc", v))
    return out


JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
# jemalloc keeps freed pages (no purging back to the kernel): what makes it cache large blocks
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc(arg: str) -> str | None:
    """``--jemalloc``: 'auto' (the first of JEMALLOC_PATHS that exists), 'none', or a path."""
    if arg == "none":
        return None
    if arg != "auto":
        if not os.path.exists(arg):
            raise SystemExit(f"--jemalloc {arg}: no such file (give the path of libjemalloc.so.2)")
        return arg
    return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def fit_step_with_allocator(args: argparse.Namespace, library: str) -> dict[str, Any]:
    """:func:`bench_fit_step` in a fresh process with ``library`` preloaded (LD_PRELOAD)."""
    cmd = [sys.executable, "-m", MODULE, "--_fit_step", "--threads", str(args.threads)]
    cmd += ["--device", args.device] + (["--smoke"] if args.smoke else [])
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, LD_PRELOAD=library, MALLOC_CONF=JEMALLOC_CONF, PYTHONPATH=pythonpath)
    env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fit step with {library} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(library=library, malloc_conf=JEMALLOC_CONF)
    return out


@contextlib.contextmanager
def _conv_batches() -> Iterator[list[int]]:
    """The batch size of every ``nn.Conv2d`` call inside the block (a global forward pre-hook)."""
    seen: list[int] = []

    def record(module: nn.Module, inputs: tuple) -> None:
        if isinstance(module, nn.Conv2d):
            seen.append(int(inputs[0].shape[0]))

    hook = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        yield seen
    finally:
        hook.remove()


def bench_fit_step(s: dict[str, Any], device: str) -> dict[str, Any]:
    """One ``ocdwrap.fit`` step of the full-matrix path at the library's defaults on an 84 x 120
    layer (LeNet5's fc2; batch 128, the default UNet), in one pass (``FitArgs(micro_batch_size=
    128)``, what fit did before micro-batching) and in fit's automatic micro-batches
    (``micro_batch_size=None``): wall time, user and kernel CPU time, minor page faults per step,
    and the micro-batch the UNet was called with. Each is timed in a fit of ``fit_step_reps``
    steps after a one-step warm-up fit; the wall time is the report's (the training loop), the
    CPU time and faults are the whole call's (its setup is small next to a step). The collection
    holds random inputs to a two-layer MLP with a layer of that shape: the cost does not depend
    on the values. On a shared machine the CPU time (user + kernel) is the figure to compare:
    wall time also counts waiting for a core."""
    shape, batch, n = s["fit_step_shape"], s["fit_step_batch"], s["fit_step_reps"]
    cfg = ocdwrap.OCDConfig(delta="full", unet_channels=s["unet_default"] or PINNED_UNET)
    torch.manual_seed(0)
    layers = {
        "layer": nn.Linear(shape[1], shape[0]),
        "act": nn.ReLU(),
        "head": nn.Linear(shape[0], 10),
    }
    base = nn.Sequential(OrderedDict(layers)).eval().to(device)
    model = ocdwrap.wrap(base, layer="layer", config=cfg)
    data = tensor_loader(torch.randn(batch, shape[1]), torch.randint(0, 10, (batch,)), batch)
    out: dict[str, Any] = {
        "weight_shape": list(shape),
        "batch": batch,
        "unet_channels": list(cfg.unet_channels),
    }
    with tempfile.TemporaryDirectory(prefix="ocdwrap-fit-step-") as work:
        store = ocdwrap.collect(model, data, CE, work, progress=False)
        for name, micro in (("one_pass", batch), ("micro_batched", None)):
            args = ocdwrap.FitArgs(batch_size=batch, micro_batch_size=micro, checkpoint_every=0)
            with _conv_batches() as calls:  # warm-up; the micro-batch the UNet is called with
                ocdwrap.fit(model, store, args.replace(steps=1), progress=False)
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            report = ocdwrap.fit(model, store, args.replace(steps=n), progress=False)
            sync(device)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            user, system = (r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n
            out[name] = {
                "micro_batch": max(calls),
                "seconds_per_step": report.seconds / n,
                "user_s": user,
                "kernel_s": system,
                "kernel_share": system / max(user + system, 1e-9),
                "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / n,
            }
    out["speedup"] = out["one_pass"]["seconds_per_step"] / out["micro_batched"]["seconds_per_step"]
    out["cpu_speedup"] = (out["one_pass"]["user_s"] + out["one_pass"]["kernel_s"]) / max(
        out["micro_batched"]["user_s"] + out["micro_batched"]["kernel_s"], 1e-9
    )
    return out


def bench_compile(base: nn.Module, x: torch.Tensor, device: str, reps: int) -> dict[str, Any]:
    """``torch.compile`` (inductor) of the rank1 denoiser pass and of a whole wrapped model's
    forward at the default sampling steps, each against eager (compile time reported apart;
    an untrained generator, seeded so both draw the same noise: timing does not depend on the
    weights)."""
    B = 256
    cfg = ocdwrap.OCDConfig(**PINNED_MLP, delta="rank1")
    h = OCDHyperNetwork(cfg, kind="linear", weight_shape=(84, 120), dims=(120, 84, 10)).to(device)
    net = h.ema.eval()
    xt = torch.randn(B, 84, device=device)
    c = torch.randn(B, cfg.cond_dim, device=device)
    t = torch.full((B,), 500, device=device)
    out: dict[str, Any] = {"batch": B}
    with torch.no_grad():
        start = time.perf_counter()
        compiled = torch.compile(net)
        compiled(xt, t, c)
        sync(device)
        compile_s = time.perf_counter() - start
        times = interleaved(
            {"eager": lambda: net(xt, t, c), "compiled": lambda: compiled(xt, t, c)},
            4 * reps,
            device,
        )
        out.update(
            eager_ms=1e3 * statistics.median(times["eager"]),
            compiled_ms=1e3 * statistics.median(times["compiled"]),
            speedup=paired_ratio(times["eager"], times["compiled"]),
            compile_seconds=compile_s,
        )
        # the whole OCD forward of a wrapped model
        m = ocdwrap.wrap(
            copy.deepcopy(base).to(device),
            layer=LAYER,
            config=cfg,
            sampling=ocdwrap.SamplingConfig(seed=0),
        )
        xb = x[:B].to(device)
        cond, _ = m.conditioning(xb)
        m.hypernet = (
            OCDHyperNetwork(cfg, kind="linear", weight_shape=m.weight_shape, dims=cond.dims)
            .to(device)
            .eval()
        )
        with m.sampling(sampling_steps=DEFAULT_STEPS):
            eager_out = m(xb)
            start = time.perf_counter()
            try:
                cm = torch.compile(m)
                compiled_out = cm(xb)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                out["model"] = {"compiles": False, "error": f"{type(e).__name__}: {e}"[:500]}
                return out
            sync(device)
            model_compile_s = time.perf_counter() - start

            def base_call():
                with m.disable_adapter():
                    return m(xb)

            mt = interleaved(
                {"base": base_call, "eager": lambda: m(xb), "compiled": lambda: cm(xb)},
                reps,
                device,
            )
        out["model"] = {
            "compiles": True,
            "sampling_steps": DEFAULT_STEPS,
            "max_abs_diff_vs_eager": float((compiled_out - eager_out).abs().max()),
            "compile_seconds": model_compile_s,
            "eager_overhead": paired_ratio(mt["eager"], mt["base"]),
            "compiled_overhead": paired_ratio(mt["compiled"], mt["base"]),
            "speedup": paired_ratio(mt["eager"], mt["compiled"]),
        }
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument(
        "--samples", type=int, default=4096, help="training samples collected (default 4096)"
    )
    p.add_argument(
        "--loop-samples", type=int, default=256, help="samples for the one-at-a-time loop"
    )
    p.add_argument(
        "--full-batch",
        type=int,
        default=None,
        help="large batch for the full-matrix UNet path (default: 16 on CPU, 256 on CUDA)",
    )
    p.add_argument("--reps", type=int, default=11, help="timing repeats (median)")
    p.add_argument("--no-paper-unet", action="store_true", help="skip the paper-size UNet pass")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument(
        "--no-integrity",
        action="store_true",
        help="skip the checksum-verification rows (benchmarks.integrity's, in this run)",
    )
    p.add_argument(
        "--integrity-samples",
        type=int,
        default=20_000,
        help="samples of the synthetic collections the verification is timed on (default 20000)",
    )
    p.add_argument(
        "--no-fit-step",
        action="store_true",
        help="skip the full-path fit step (its one-pass variant needs several GB at batch 128)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile on the rank1 denoiser (off by default: ~30 s to compile)",
    )
    p.add_argument(
        "--memory-jobs",
        type=int,
        default=2,
        help="memory subprocesses run side by side (default 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where collections go (default: a temp dir)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    p.add_argument(
        "--collection-only",
        action="store_true",
        help="only the collection figures (a few minutes; for repeated A/B runs of two versions)",
    )
    p.add_argument(
        "--jemalloc",
        default="auto",
        help="libjemalloc.so.2 to preload for a second measurement of the fit step "
        "('auto': the system's, if installed; 'none': skip)",
    )
    p.add_argument(
        "--memory-ab",
        nargs="+",
        default=None,
        metavar="LABEL=PATH",
        help="only the A/B of fit's full-path peak memory between source trees (checkouts)",
    )
    p.add_argument("--memory-ab-runs", type=int, default=4, help="processes per tree (--memory-ab)")
    p.add_argument(
        "--update-doc",
        default=None,
        metavar="MARKDOWN",
        help="only re-render the speed-doc blocks of this page (docs/performance.md) from the "
        "JSONs they name",
    )
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_fit_step", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args._child:
        with open(args._child) as f:
            print(json.dumps([child(job) for job in json.load(f)]))
        return {}
    if args.memory_ab:
        return memory_ab(args, argv)
    if args.update_doc:
        print(f"{args.update_doc}: {update_doc(args.update_doc)} blocks rendered")
        return {}
    torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here.")
    s = settings(args)
    if args._fit_step:  # the fit step again, in a process started with another allocator
        print(json.dumps(bench_fit_step(s, device)))
        return {}
    jemalloc = None if device.startswith("cuda") else find_jemalloc(args.jemalloc)
    start = time.perf_counter()
    load0 = os.getloadavg()
    work = args.workdir or tempfile.mkdtemp(prefix="ocdwrap-speed-")
    os.makedirs(work, exist_ok=True)
    try:
        d = load_mnist(seed=args.seed)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(d["train"][1]), generator=g)[: s["samples"]]
        x, y = d["train"][0][idx].contiguous(), d["train"][1][idx].contiguous()
        torch.manual_seed(args.seed)
        base = zoo.LeNet5()
        zoo.train_base(
            base,
            tensor_loader(x, y, 128),
            tensor_loader(d["val"][0][:2000], d["val"][1][:2000], 1000),
            CE,
            max_epochs=s["train_epochs"],
            device=device,
            seed=args.seed,
            progress=False,
        )
        base = base.cpu().eval()
        phases = {"setup": time.perf_counter() - start}
        print("collection ...", file=sys.stderr, flush=True)
        collection = bench_collection(base, x, y, s, device, work)
        phases["collection"] = time.perf_counter() - start - sum(phases.values())
        if args.collection_only:  # a short run: repeated to compare versions under one load
            results = {
                "command": command(MODULE, argv),
                "date": datetime.date.today().isoformat(),
                "machine": machine(device),
                "threads": args.threads,
                "torch": torch.__version__,
                "load_average_start": list(load0),
                "load_average_end": list(os.getloadavg()),
                "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
                "collection": collection,
                "seconds": time.perf_counter() - start,
            }
            c = collection
            print(
                f"prefix alone {c['prefix_epochs']:.2f}, overfit_batch alone "
                f"{c['overfit_epochs']:.2f} epochs; "
                f"collect(rank1): {c['collect_rank1_epochs']:.2f} epochs "
                f"[{c['collect_rank1_epochs_range'][0]:.2f}-{c['collect_rank1_epochs_range'][1]:.2f}],"
                f" {c['collect_rank1_vs_loop']:.1f}x the loop; vectorized / loop "
                f"{c['speedup_vs_loop']:.1f}x"
            )
            if args.json:
                write_json(args.json, results, indent=2)
            return results
        print("fitting and inference ...", file=sys.stderr, flush=True)
        inference, fitting = bench_inference(base, x, s, device, work)
        phases["fitting_inference"] = time.perf_counter() - start - sum(phases.values())
        fit_step: dict[str, Any] = {}
        if not args.no_fit_step:
            print("one fit step of the full path ...", file=sys.stderr, flush=True)
            fit_step = bench_fit_step(s, device)
        if jemalloc and fit_step:
            print(f"the same with {jemalloc} preloaded ...", file=sys.stderr, flush=True)
            fit_step["jemalloc"] = fit_step_with_allocator(args, jemalloc)
        phases["fit_step"] = time.perf_counter() - start - sum(phases.values())
        memory: dict[str, Any] = {}
        if not args.no_memory:
            print("memory ...", file=sys.stderr, flush=True)
            memory = bench_memory(base, x, y, s, args, work)
            phases["memory"] = time.perf_counter() - start - sum(phases.values())
        results: dict[str, Any] = {
            "command": command(MODULE, argv),
            "date": datetime.date.today().isoformat(),
            "machine": machine(device),
            "device": device,
            "threads": args.threads,
            "torch": torch.__version__,
            "load_average_start": list(load0),
            "load_average_end": list(os.getloadavg()),
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
            "paper_cost_model": {
                "overfit_steps_per_sample": 3,
                "one_sample_at_a_time": True,
                "unet_passes_per_test_sample": PAPER_STEPS,
                "unet_pass_ms": PAPER_UNET_PASS_MS,
                "gpu": "RTX 2060",
                "ms_per_test_sample": PAPER_STEPS * PAPER_UNET_PASS_MS,
            },
            "collection": collection,
            "inference": inference,
            "fitting": fitting,
            "fit_step": fit_step,
            "memory": memory,
        }
        if args.compile:
            print("torch.compile ...", file=sys.stderr, flush=True)
            results["compile"] = bench_compile(base, x, device, s["reps"])
        if not args.no_integrity:  # what checking a collection's checksums costs fit's loading
            from . import integrity

            print("checksum verification ...", file=sys.stderr, flush=True)
            n = 300 if args.smoke else args.integrity_samples
            results["integrity"] = {
                delta: integrity.bench(delta, n, 2 if args.smoke else integrity.REPS[delta], work)
                for delta in ("rank1", "full")
            }
        results["goals"] = goals(results, s)
        results["seconds"] = time.perf_counter() - start
        results["phase_seconds"] = phases
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    if args.json:
        write_json(args.json, results, indent=2)
    return results


if __name__ == "__main__":
    main()
