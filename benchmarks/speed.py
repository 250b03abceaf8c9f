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
import copy
import datetime
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
from collections.abc import Callable
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
from .timing import machine, one_epoch_seconds, sync, timed

MODULE = "benchmarks.speed"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = "fc2"
PAPER_UNET_PASS_MS = 27.0  # the paper's figure, RTX 2060
PAPER_STEPS = 10


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
            paper_unet=not args.no_paper_unet,
            train_epochs=2,
            unet_small=(8, 16),
            unet_default=None,  # OCDConfig's default
            mlp_hidden=None,
            fit_step_shape=(84, 120),  # LeNet5's fc2
            fit_step_batch=128,  # OCDConfig's fit_batch_size
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
    extra: dict[str, Any] = {}
    if s["unet_default"] is not None:
        extra["unet_channels"] = s["unet_default"]
    if s["mlp_hidden"] is not None:
        extra.update(mlp_hidden=s["mlp_hidden"], cond_dim=s["mlp_hidden"])
    extra.update(kw)
    return ocdwrap.OCDConfig(sampling_steps=PAPER_STEPS, **extra)


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
    model = ocdwrap.wrap(copy.deepcopy(base).to(device), layer=LAYER, config=base_config(s))
    xv, yv = x[: s["vec_samples"]].to(device), y[: s["vec_samples"]].to(device)
    batches = [(xv[i : i + B], yv[i : i + B]) for i in range(0, len(yv), B)]
    L = s["loop_samples"]
    xl, yl = x[:L].to(device), y[:L].to(device)

    def vectorized() -> None:
        for b in batches:
            ocdwrap.overfit_batch(model, b[0], b[1], CE)

    def whole_passes() -> None:  # the same without the split forward (K+1 whole passes)
        split_mod.ENABLED = False
        try:
            vectorized()
        finally:
            split_mod.ENABLED = True

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

    out.update(collect_against_epochs(base, x, y, s, device, work))
    return out


def collect_against_epochs(
    base: nn.Module, x: torch.Tensor, y: torch.Tensor, s: dict[str, Any], device: str, work: str
) -> dict[str, Any]:
    """Whole collect() runs (full and rank1) against one epoch of base training on the same
    samples; the collections stay under ``work`` for the fitting and memory benchmarks."""
    B, N = s["batch"], len(y)
    train_loader = tensor_loader(x, y, 128)
    epochs: list[float] = []
    collect_s: dict[str, float] = {}
    base_dev = copy.deepcopy(base).to(device)
    epochs.append(one_epoch_seconds(base_dev, train_loader, CE, device))  # warm-up, not counted
    for delta in ("full", "rank1"):
        epochs.append(one_epoch_seconds(base_dev, train_loader, CE, device))
        m = ocdwrap.wrap(
            copy.deepcopy(base).to(device), layer=LAYER, config=base_config(s, delta=delta)
        )
        d = os.path.join(work, f"collect-{delta}")
        shutil.rmtree(d, ignore_errors=True)
        collect_s[delta] = timed(
            lambda m=m, d=d: ocdwrap.collect(m, tensor_loader(x, y, B), CE, d, progress=False),
            device,
        )[1]
    epochs.append(one_epoch_seconds(base_dev, train_loader, CE, device))
    epoch = statistics.median(epochs[1:])
    out: dict[str, Any] = dict(
        train_samples=N,
        epoch_batch_size=128,
        epoch_seconds=epoch,
        epoch_seconds_all=epochs[1:],
    )
    for delta, secs in collect_s.items():
        out[f"collect_{delta}_seconds"] = secs
        out[f"collect_{delta}_samples_per_s"] = N / secs
        out[f"collect_{delta}_epochs"] = secs / epoch
    return out


# --------------------------------------------------------------------------- 2. + 3. fit, inference


def fitted(
    base: nn.Module, delta: str, s: dict[str, Any], device: str, work: str
) -> tuple[ocdwrap.OCDModel, dict[str, Any]]:
    cfg = base_config(s, delta=delta, checkpoint_every=0)
    m = ocdwrap.wrap(copy.deepcopy(base).to(device), layer=LAYER, config=cfg)
    full = delta == "full"
    steps = s["fit_steps_full"] if full else s["fit_steps_rank1"]
    bs = s["fit_batch_full"] if full else cfg.fit_batch_size
    report = ocdwrap.fit(
        m, os.path.join(work, f"collect-{delta}"), steps=steps, batch_size=bs, progress=False
    )
    info = {
        "samples_per_s": report.samples_per_second,
        "steps": steps,
        "batch_size": bs,
        "seconds": report.seconds,
        "generator_params": sum(p.numel() for p in m.hypernet.net.parameters()),
    }
    return m, info


def untrained(base: nn.Module, cfg: ocdwrap.OCDConfig, dims: tuple, device: str):
    m = ocdwrap.wrap(copy.deepcopy(base).to(device), layer=LAYER, config=cfg)
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
    ``steps``: the sampling steps in force (default: the model's config)."""
    out: dict[str, Any] = {}
    for B in batches:
        xb = x[:B].to(device)
        # the full UNet beyond batch 1 on CPU takes seconds per call: one timed call each
        # (after the batch-1 warm-up) instead of interleaved repeats
        heavy = m.config.delta == "full" and B > 1 and not device.startswith("cuda")
        r = 1 if heavy else min(reps, 3) if m.config.delta == "full" else reps

        def base_call(xb=xb):
            with m.disable_ocd():
                return m(xb)

        def ocd_call(xb=xb):
            return m(xb)

        def whole_call(xb=xb):
            split_mod.ENABLED = False
            try:
                return m(xb)
            finally:
                split_mod.ENABLED = True

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
        steps = steps or m.config.sampling_steps
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
    for n in s["fewer_steps"]:  # benchmarks.sampling_steps measures what they cost in accuracy
        with r1.sampling(sampling_steps=n):
            inference[f"rank1_{n}_steps"] = {
                "generator": f"the same, {n} sampling steps"
                + (" (the library's default)" if n == ocdwrap.OCDConfig().sampling_steps else ""),
                **bench_inference_one(r1, x, [s["big_batch"]], reps, device, steps=n),
            }
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
        delta="lowrank",
        delta_rank=4,
        output_layout="channels_last",
        output_grid=nerf.OUTPUT_GRID,
        task="regression",
        overfit_steps=2,
        fit_steps=2,
        checkpoint_every=0,
    )
    m = ocdwrap.wrap(base, layer="fc1", config=cfg)
    poses = scenes.hemisphere_poses(views, seed=0).to(device)
    images = torch.rand(views, size, size, 3, device=device)
    store = ocdwrap.collect(
        m, tensor_loader(poses, images, views), nerf.image_mse, os.path.join(work, "nerf"),
        progress=False,
    )  # fmt: skip
    ocdwrap.fit(m, store, progress=False)
    out = bench_inference_one(m, poses, [views], s["reps"], device)
    out["generator"] = (
        f"MLP denoiser over rank-{cfg.delta_rank} factors of fc1 (128 x 63); views of "
        f"{size} x {size} px, {samples} depth samples, {cfg.sampling_steps} sampling steps"
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
    cfg = base_config(s, delta=job["delta"], checkpoint_every=0)
    m = ocdwrap.wrap(base, layer=LAYER, config=cfg)
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
        bs = s["fit_batch_full"] if full else cfg.fit_batch_size

        def run(warm: bool) -> None:
            n = 1 if warm else steps
            ocdwrap.fit(m, job["store"], steps=n, batch_size=bs, progress=False)

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


def run_child(jobs: list[dict[str, Any]], work: str) -> list[dict[str, Any]]:
    """Run memory measurements in one fresh Python process (in order) and return their results."""
    name = "+".join(f"{j['what']}-{j['delta']}" for j in jobs)
    path = os.path.join(work, f"job-{name}.json")
    with open(path, "w") as f:
        json.dump(jobs, f)
    threads = str(jobs[0]["threads"])
    pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONPATH=pythonpath)
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, "--_child", path],
        capture_output=True,
        text=True,
        env=env,
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


# --------------------------------------------------------------------------- report


def goals(r: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    c, inf = r["collection"], r["inference"]
    big = str(s["big_batch"])
    collect_rate = c["train_samples"] / c["collect_rank1_seconds"]
    out = {
        "vectorized_vs_loop_at_least_20x": c["speedup_vs_loop"] >= 20,
        "collect_rank1_end_to_end_vs_loop_at_least_20x": collect_rate / c["loop_samples_per_s"]
        >= 20,
        "collect_rank1_at_most_1_epoch": c["collect_rank1_epochs"] <= 1,
        "collect_full_at_most_3_epochs": c["collect_full_epochs"] <= 3,
    }
    # the library's default sampling steps (the goal), and each other count measured
    default = f"rank1_{ocdwrap.OCDConfig().sampling_steps}_steps"
    for k, v in inf.items():
        if k == "rank1" or (k.startswith("rank1_") and k.endswith("_steps")):
            name = f"{k}_default" if k == default else k
            out[f"{name}_overhead_at_most_2x_at_batch_{big}"] = v[big]["overhead"] <= 2
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
        "",
        f"## Inference ({inf['sampling_steps']} sampling steps): OCD forward / base forward",
        "| generator | batch | overhead | split off | OCD ms/sample | base ms/sample "
        "| denoiser pass ms | base passes / generation ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    keys = ["rank1", *(k for k in inf if k.startswith("rank1_") and k.endswith("_steps"))]
    for key in (*keys, "rank1_hidden128", "full", "full_small_unet", "lowrank_render"):
        if key not in inf:
            continue
        for B, v in inf[key].items():
            if B == "generator":
                continue
            b = v["breakdown_ms"]
            whole = f"{v['overhead_whole_passes']:.1f}x" if "overhead_whole_passes" in v else "-"
            lines.append(
                f"| {key}: {inf[key]['generator']} | {B} | {v['overhead']:.1f}x | {whole} | "
                f"{v['ocd_ms_per_sample']:.3f} | {v['base_ms_per_sample']:.4f} | "
                f"{v['denoiser_pass_ms']:.2f} | {b['base_passes']:.1f} / {b['generation']:.1f} |"
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
    if "fit_step" in r:
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


def bench_fit_step(s: dict[str, Any], device: str) -> dict[str, Any]:
    """One fit step of the full-matrix path at the library's defaults on LeNet5's 84 x 120 layer
    (batch 128, the default UNet), in one pass ("one_pass", what fit did before micro-batching)
    and in fit's automatic micro-batches: wall time, user and kernel CPU time, minor page faults.
    Random targets and conditioning: the cost does not depend on the values. On a shared machine
    the CPU time (user + kernel) is the figure to compare: wall time also counts waiting for a
    core."""
    from ocdwrap.fit import _accumulate, _micro_batch

    shape, batch = s["fit_step_shape"], s["fit_step_batch"]
    cfg = ocdwrap.OCDConfig(
        delta="full", **({"unet_channels": s["unet_default"]} if s["unet_default"] else {})
    )
    torch.manual_seed(0)
    hyper = OCDHyperNetwork(
        cfg, kind="linear", weight_shape=shape, dims=(shape[1], shape[0], 10)
    ).to(device)
    opt = torch.optim.Adam(hyper.net.parameters(), lr=cfg.fit_lr)
    batch_t = (
        torch.randn(batch, *shape), torch.randn(batch, shape[1]), torch.randn(batch, shape[0]),
        torch.randn(batch, 10), torch.rand(batch) + 0.5, torch.randint(0, 1000, (batch,)),
        torch.randn(batch, *shape),
    )  # fmt: skip
    batch_t = tuple(t.to(device) for t in batch_t)
    out: dict[str, Any] = {
        "weight_shape": list(shape),
        "batch": batch,
        "unet_channels": list(cfg.unet_channels),
    }
    for name, micro in (("one_pass", batch), ("micro_batched", _micro_batch(hyper, batch))):

        def step(micro: int = micro) -> None:
            opt.zero_grad(set_to_none=True)
            _accumulate(hyper, batch_t, micro)
            opt.step()

        step()  # warm-up
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(s["fit_step_reps"]):
            step()
        sync(device)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        n = s["fit_step_reps"]
        user, system = (r1.ru_utime - r0.ru_utime) / n, (r1.ru_stime - r0.ru_stime) / n
        out[name] = {
            "micro_batch": micro,
            "seconds_per_step": (t1 - t0) / n,
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


def bench_compile(x: torch.Tensor, device: str, reps: int) -> dict[str, Any]:
    """The rank1 denoiser pass, eager against ``torch.compile`` (compile time reported apart)."""
    cfg = ocdwrap.OCDConfig(delta="rank1")
    h = OCDHyperNetwork(cfg, kind="linear", weight_shape=(84, 120), dims=(120, 84, 10)).to(device)
    net = h.ema.eval()
    B = 256
    xt = torch.randn(B, 84, device=device)
    c = torch.randn(B, cfg.cond_dim, device=device)
    t = torch.full((B,), 500, device=device)
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
    eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {
        "batch": B,
        "eager_ms": 1e3 * eager,
        "compiled_ms": 1e3 * comp,
        "speedup": paired_ratio(times["eager"], times["compiled"]),
        "compile_seconds": compile_s,
    }


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
        "--jemalloc",
        default="auto",
        help="libjemalloc.so.2 to preload for a second measurement of the fit step "
        "('auto': the system's, if installed; 'none': skip)",
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
        print("fitting and inference ...", file=sys.stderr, flush=True)
        inference, fitting = bench_inference(base, x, s, device, work)
        phases["fitting_inference"] = time.perf_counter() - start - sum(phases.values())
        print("one fit step of the full path ...", file=sys.stderr, flush=True)
        fit_step = bench_fit_step(s, device)
        if jemalloc:
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
            results["compile"] = bench_compile(x, device, s["reps"])
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
