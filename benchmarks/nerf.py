"""TinyNeRF on rendered scenes: the paper's Table 3 (novel-view synthesis, MSE on held-out views).

    python -m benchmarks.nerf --json runs/nerf.json                 # CPU default: lego, seed 0
    python -m benchmarks.nerf --scenes lego hotdog drums --seeds 0 1 2 --json runs/nerf_3x3.json
    python -m benchmarks.nerf --smoke                               # seconds; checks the plumbing

Data: the Blender scenes are not available offline, so ``benchmarks.scenes`` renders three
procedural stand-ins (``lego``, ``hotdog``, ``drums``): 100 training and 25 held-out views on the
upper hemisphere, focal 138.9 at 100 x 100 pixels (scaled with ``--size``), black background,
cached in ``~/.cache/ocdwrap/scenes``.

Model (the TinyNeRF of the paper's released code, docs/results.md section 5): each 3-D point is positionally encoded to
63 values (the point and sin / cos of 10 octaves), then ``fc1`` 63 -> 128, ReLU, ``fc2`` 128 ->
128, ReLU, ``out`` 128 -> 4 (RGB through a sigmoid; density through softplus(x - 1), as in
mip-NeRF: with the authors' ReLU the base sat at the all-black image for all of a 3,000-iteration
CPU budget on these black-background scenes, its density gradient dead); colour is composited
along each ray over ``--samples`` depth samples in [2, 6]. ``TinyNeRF(poses)`` takes a batch of
camera poses (B, 4, 4) and returns the rendered images (B, H, W, 3) with *fixed* depth samples
(bin midpoints), so every row renders exactly the same rays. The base is trained with Adam 5e-3
(linear warm-up over the first 100 steps) on random batches of ``--rays`` rays of the training
views (stratified depth samples) for ``--iterations`` steps.

OCD: on ``fc1`` (128 x 63, the layer the paper's selection picks), which sees every point of
every ray: its input is (B, rays x samples, 63), the batch in dim 0, so one view's delta sums
the gradients of thousands of points and is not rank one. A sample is one view (pose -> image);
its overfit is Adam 5e-3 x 10 steps on the whole-image MSE, weight only (the authors' setting).
The main rows' generator works on low-rank deltas (``--delta lowrank``, rank ``--delta-rank``,
the library default 4: each view's delta kept as its top-4 SVD factor pairs, an MLP denoiser);
the full-matrix UNet at a CPU size (``--unet-channels``, (8, 16)) is a row of its own, fitted on
its own collection of the same views (``--delta full`` makes it the main rows instead).
Conditioning is what ocdwrap captures, label-free: the mean positional encoding of the view's ray
points (a function of the pose), the mean fc1 activation, and the base render read
channels-last and pooled to 4 x 4 cells per colour (``OCDConfig(output_layout="channels_last",
output_grid=4)``, ``--output-grid``).

Rows, per scene, mean ± sd over seeds, MSE and PSNR (= -10 log10 of the mean MSE) on the
held-out views: base; base + compute-matched (the base trained further, same recipe, for the wall
time of OCD's collection and fitting); OCD (1 draw); OCD(K); no scaling (global rho); the
regression generator; nearest neighbour (the stored delta of the training view whose pose is
closest, L2 on the 4 x 4 matrix); the full-matrix UNet (1 draw); overfit on the test view with its delta truncated to rank r
(SVD: what a rank-r parameterisation can express at best); overfit on the test view (upper
bound). The paper's Table 3 numbers stand beside ours; they are for the real Blender scenes.

CPU default (one scene, one seed, within 20 minutes on 2 shared cores, ``OMP_NUM_THREADS=1``):
views of 32 x 32 pixels (focal 44.45), 16 depth samples per ray, all 100 training views
collected, 25 test views; base 2,000 iterations of 512 rays (the authors: 3,000 iterations);
400 fit steps (low-rank: batches of 256; the UNet with channels (8, 16): batches of 16). One overfit of a view (11 passes over
its 16,384 ray points) takes 1.5 to 2.5 s there, a fit step 0.2 to 0.7 s (with other jobs
running), and the compute-matched row costs as much again as collection and fit together.
With 24 samples and 500 fit steps the run took 23 minutes on that machine, loaded. The paper's
size is 100 x 100 px: ``--size 100 --samples 64 --rays 4096 --unet-channels 32 64 64
--fit-steps 5000`` is near the authors' setting, for a GPU (``--device cuda``), not for 2 cores.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import ocdwrap
from ocdwrap.compare import Metric as CompareMetric
from ocdwrap.compare import Row as CompareRow
from ocdwrap.deltas import FullDelta
from ocdwrap.generators import GlobalScale

from . import cli, notes
from .controls import Agreement, rank_energy, truncate
from .datasets import tensor_loader
from .experiment import (
    CompareRun,
    add_run,
    headroom_info,
    pixels,
    run_compare,
    table_rows,
)
from .results import Metric, Results, Row, fmt_mean_sd
from .scenes import (
    FAR,
    NEAR,
    SCENES,
    SceneData,
    SceneShapeError,
    camera_rays,
    check_images,
    composite,
    load_scene,
)
from .scoring import Task, evaluate_module, evaluate_with_deltas
from .timing import log, peak_rss_mb, timed

MODULE = "benchmarks.nerf"
LAYER = "fc1"
OVERFIT_LR, OVERFIT_STEPS = 5e-3, 10  # the authors' TinyNeRF overfit
# the paper's Table 3 (MSE on the real Blender scenes): base, overfit on test, OCD
PAPER = {
    "lego": (".076", ".043", ".052"),
    "hotdog": (".063", ".032", ".047"),
    "drums": (".068", ".049", ".057"),
}
UNET_CHANNELS = (8, 16)  # the full-matrix UNet at a CPU size
OUTPUT_GRID = 4  # the base render pooled to 4 x 4 cells per colour for the conditioning
METRICS = [Metric("mse", "test MSE", ".5f"), Metric("psnr", "test PSNR (dB)", ".2f")]


# --- the model -------------------------------------------------------------------------------
class TinyNeRF(nn.Module):
    """The authors' TinyNeRF: positional encoding to 63 values, 63 -> 128 -> 128 -> 4.

    ``forward(poses (B, 4, 4)) -> images (B, size, size, 3)``, every ray rendered with the same
    ``samples`` fixed depths (bin midpoints in [NEAR, FAR]); :meth:`render_rays` renders any rays
    with any depths (training uses stratified ones). All points of a batch go through ``fc1`` in
    one call whose input is (B, rays x samples, 63): the batch (the view) stays in dim 0, as
    ocdwrap's per-sample layer needs.
    """

    def __init__(
        self,
        size: int,
        focal: float,
        *,
        samples: int = 32,
        freqs: int = 10,
        width: int = 128,
        background: float = 0.0,
    ) -> None:
        super().__init__()
        self.size, self.focal, self.samples, self.background = size, focal, samples, background
        self.in_dim = 3 + 6 * freqs  # 63 for the authors' 10 octaves
        self.fc1 = nn.Linear(self.in_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 4)
        self.register_buffer("bands", 2.0 ** torch.arange(freqs), persistent=False)

    def encode(self, pts: torch.Tensor) -> torch.Tensor:
        """(..., 3) -> (..., 63): the point, then sin and cos of it at 2^0 .. 2^9."""
        x = pts.unsqueeze(-1) * self.bands
        return torch.cat([pts, x.sin().flatten(-2), x.cos().flatten(-2)], -1)

    def render_rays(
        self, origins: torch.Tensor, dirs: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Colours (B, R, 3) of rays (B, R, 3) at depths ``t`` (S,) or (B, R, S).

        Written so that ``torch.fx`` can trace it (no Python branch on a tensor's shape): then
        ocdwrap's split forward encodes the points once per OCD forward instead of twice."""
        B, R = origins.shape[0], origins.shape[1]
        t = t.expand(B, R, -1)  # (B, R, S); a no-op for depths given per ray
        pts = origins.unsqueeze(2) + dirs.unsqueeze(2) * t.unsqueeze(-1)  # (B, R, S, 3)
        h = self.encode(pts).reshape(B, -1, self.in_dim)  # (B, R*S, 63), sample-major
        h = self.out(torch.relu(self.fc2(torch.relu(self.fc1(h))))).reshape(B, R, -1, 4)
        sigma, rgb = F.softplus(h[..., 3] - 1), torch.sigmoid(h[..., :3])
        step = torch.cat([t[..., 1:] - t[..., :-1], torch.full_like(t[..., :1], 1e10)], -1)
        return composite(sigma, rgb, step, self.background)

    def depths(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The fixed depth samples (S,) of :meth:`forward`."""
        s = torch.arange(self.samples, dtype=torch.float32, device=device)
        return NEAR + (FAR - NEAR) * (s + 0.5) / self.samples

    def forward(self, poses: torch.Tensor) -> torch.Tensor:
        origins, dirs = camera_rays(poses, self.size, self.size, self.focal)
        rgb = self.render_rays(origins, dirs, self.depths(poses.device))
        return rgb.reshape(poses.shape[0], self.size, self.size, 3)


def image_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-view mean squared error (B,) of images (B, H, W, 3): the loss of every row."""
    check_images(target, pred.shape[1], "target images")
    if target.shape != pred.shape:
        raise SceneShapeError(
            f"target images {tuple(target.shape)} do not match the rendered {tuple(pred.shape)}; "
            "pass one target view per pose, rendered at the model's size."
        )
    return (pred - target).pow(2).flatten(1).mean(1)


class ImageTask(Task):
    """Regression on images: per-view MSE, reported as MSE and PSNR of the mean MSE."""

    def __init__(self) -> None:
        super().__init__("regression", image_mse)

    def metrics(self, res: dict[str, Any]) -> dict[str, float]:
        mse = float(res["loss"])
        return {"mse": mse, "psnr": -10 * math.log10(max(mse, 1e-12))}


# --- training ----------------------------------------------------------------------------------
def train_nerf(
    model: TinyNeRF,
    data: SceneData,
    *,
    lr: float,
    rays: int,
    seed: int,
    iterations: int | None = None,
    seconds: float | None = None,
    warmup: int = 100,
) -> dict[str, Any]:
    """Adam on random batches of ``rays`` training rays (stratified depths) until ``iterations``
    steps or ``seconds`` of wall time, whichever comes first; the model ends in eval mode.

    The lr rises linearly over the first ``warmup`` steps: at the full 5e-3 from the first step
    the density often collapses to the all-black image of these black-background scenes and
    stays there for hundreds of steps."""
    dev = model.fc1.weight.device
    origins, dirs = camera_rays(data.train_poses.to(dev), data.size, data.size, data.focal)
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    colours = data.train_images.to(dev).reshape(-1, 3)
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses, steps, t0 = [], 0, time.perf_counter()
    bins = model.depths(dev) - (FAR - NEAR) / model.samples / 2  # the lower edge of each bin
    while (iterations is None or steps < iterations) and (
        seconds is None or time.perf_counter() - t0 < seconds
    ):
        idx = torch.randint(len(origins), (rays,), generator=g).to(dev)
        jitter = torch.rand(1, rays, model.samples, generator=g).to(dev)
        jitter = jitter * (FAR - NEAR) / model.samples
        pred = model.render_rays(origins[idx][None], dirs[idx][None], bins + jitter)
        loss = F.mse_loss(pred[0], colours[idx])
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps + 1) / max(warmup, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        steps += 1
    model.eval()
    tail = losses[-100:]
    return {
        "iterations": steps,
        "seconds": time.perf_counter() - t0,
        "rays": rays,
        "lr": lr,
        "warmup": warmup,
        "final_ray_mse": sum(tail) / max(len(tail), 1),
    }


# --- rows --------------------------------------------------------------------------------------
def rows_for(scene: str, rank: int, unet: tuple[int, ...] | None = UNET_CHANNELS) -> list[Row]:
    """The table's rows, with the paper's Table 3 numbers of ``scene`` (MSE) beside ours;
    ``unet``: the channels of the full-matrix UNet row (None: no such row, the main rows are
    the full-matrix UNet)."""
    base, overfit, ocd = PAPER.get(scene, ("—", "—", "—"))
    extra = [Row("full_unet", f"full-matrix UNet {tuple(unet)}, 1 draw")] if unet else []
    return table_rows(
        [
            "base", "compute_matched", "ocd", "ocd_k", "global", *extra, "regression", "nearest",
            "probe", Row("overfit_rank", f"overfit fc1 on test, delta truncated to rank {rank}"),
            "overfit",
        ],
        layer=LAYER,
        space="pose space",
        labels={
            "base": "base TinyNeRF",
            "overfit": "overfit fc1 on test (Adam 5e-3 × 10; upper bound)",
            "probe": "overfit fc1 on test towards a probe's prediction (no test images)",
        },
        paper={"base": {"mse": base}, "ocd": {"mse": ocd}, "overfit": {"mse": overfit}},
    )  # fmt: skip


def psnr_metric() -> tuple[dict[str, CompareMetric], Any]:
    """PSNR through ``ocdwrap.compare``'s ``metrics=``: -10 log10 of the mean MSE over the test
    views (one group: the PSNR of the mean, not a mean of PSNRs); and the function that turns a
    compare row into this table's metrics."""

    def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
        return -10 * math.log10(max(float(image_mse(pred, target).double().mean()), 1e-12))

    def one_group(inputs: Any, target: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(target), dtype=torch.long)

    def to_metrics(row: CompareRow) -> dict[str, float]:
        return {"mse": row.loss, "psnr": row.metrics["psnr"]}

    return {"psnr": CompareMetric(psnr, True, per="group", group_fn=one_group)}, to_metrics


def nerf_settings(
    args: Any, seed: int, delta: str | None = None
) -> tuple[ocdwrap.OCDConfig, ocdwrap.FitArgs, ocdwrap.SamplingConfig]:
    """The shared benchmark settings with the authors' TinyNeRF overfit (Adam 5e-3 x 10), the
    render read channels-last and pooled to ``--output-grid`` cells per colour, and low-rank
    deltas of rank ``--delta-rank`` or a CPU-sized full-matrix UNet fitted in minibatches of 16
    (``delta``, default ``--delta``): the OCDConfig, FitArgs and SamplingConfig of one seed."""
    delta = delta or args.delta
    kw: dict[str, Any] = {
        "overfit_steps": OVERFIT_STEPS,
        "delta": delta,
        "output_layout": "channels_last",
        "output_grid": args.output_grid,
    }
    if delta == "lowrank":
        kw["delta_rank"] = args.delta_rank
    cfg, fit = cli.ocd_config(args, **kw), cli.fit_args(args, seed)
    if delta == "full" and not args.paper:
        cfg = cfg.replace(unet_channels=tuple(args.unet_channels))
        fit = fit.replace(batch_size=16)
    return cfg, fit, cli.sampling_config(args, seed, task="regression")


def ocd_rows(
    args: Any, seed: int, base: TinyNeRF, data: SceneData, loaders: dict, out_dir: str
) -> tuple[CompareRun, dict[str, torch.Tensor]]:
    """The shared rows through ``ocdwrap.compare`` (nearest in pose space, PSNR as a metric,
    the compute-matched base trained further with its own recipe), and with its fitted
    generator the rows only this table has: the overfit delta truncated to rank r, and the
    full-matrix UNet on its own collection. Returns the run and the renders of test view 0
    (truth, base, OCD, overfit) for the figure."""
    task = ImageTask()
    cfg, fit, sampling = nerf_settings(args, seed)
    metrics, to_metrics = psnr_metric()
    record: dict[str, Any] = {}

    def train_more(model: nn.Module, seconds: float) -> nn.Module:
        record.update(
            train_nerf(model, data, lr=args.lr, rays=args.rays, seed=seed + 1000, seconds=seconds)
        )
        return model

    renders: dict[str, torch.Tensor] = {}
    extra: dict[str, Any] = {}
    tag = f"[{data.name} {LAYER}] "

    def after(model: ocdwrap.OCDModel, rows: dict) -> None:
        log(f"{tag}overfitting {LAYER} on each of the {len(data.test_poses)} test views")
        agree, extra["overfit_test_s"] = timed(
            lambda: Agreement(model, loaders["test"], task, len(data.test_poses))
        )
        true = {it[5]: it[3].reshape(-1, *model.weight_shape) for it in agree.items}
        extra["true_delta_rank_energy"] = rank_energy(torch.cat(list(true.values())))
        rng = torch.Generator(device=model.device).manual_seed(seed)
        extra["agreement"] = {"ocd": agree.score(lambda x, y, c, p: model.generate(c, rng=rng))}
        rows["overfit_rank"] = evaluate_with_deltas(
            model, loaders["test"], task,
            lambda x, y, p: FullDelta(truncate(true[p], args.delta_rank)),
        )  # fmt: skip
        log(f"{tag}overfit on test, rank {args.delta_rank}: {rows['overfit_rank']}")
        renders.update(first_view_renders(model, data, true[0][:1], seed))
        extra["agree"] = agree

    run = run_compare(
        base, LAYER, cfg, loaders["train"], loaders["test"], task, out_dir, fit_args=fit,
        sampling=sampling, draws=args.draws, seed=seed, train_fn=train_more, train_record=record,
        features=pixels, metrics=metrics, to_metrics=to_metrics,
        generators={"global": GlobalScale()}, progress=args.progress, tag=f"{data.name} {LAYER}",
        agreement_samples=0, after=after,
    )  # fmt: skip
    agree = extra.pop("agree")
    run.info.update(extra)
    if args.delta == "lowrank" and (args.full_unet_seeds is None or seed in args.full_unet_seeds):
        full = full_unet_row(args, seed, base, loaders, out_dir + "-full", agree)
        run.rows["full_unet"] = full.rows["ocd"]
        run.info["full_unet"] = full.info
        run.info["agreement"]["full_unet"] = full.info.pop("agreement_with_main")
    return run, renders


def full_unet_row(
    args: Any, seed: int, base: TinyNeRF, loaders: dict, out_dir: str, agree: Agreement
) -> CompareRun:
    """The full-matrix UNet at a CPU size (``--unet-channels``), on its own collection of the
    same training views: compare's ocd row (1 draw), with the cosine of its deltas with the
    overfit-on-test ones (``info["agreement_with_main"]``). Its times stay apart from the main
    OCD's, so the compute-matched row stays matched to the main OCD."""
    cfg, fit, sampling = nerf_settings(args, seed, delta="full")
    metrics, to_metrics = psnr_metric()
    found: dict[str, Any] = {}

    def after(model: ocdwrap.OCDModel, rows: dict) -> None:
        rng = torch.Generator(device=model.device).manual_seed(seed)
        found["cos"] = agree.score(lambda x, y, cond, p: model.generate(cond, rng=rng))

    run = run_compare(
        base, LAYER, cfg, loaders["train"], loaders["test"], ImageTask(), out_dir, fit_args=fit,
        sampling=sampling, rows=("ocd",), seed=seed, metrics=metrics, to_metrics=to_metrics,
        progress=args.progress, tag="full UNet", agreement_samples=0, after=after,
    )  # fmt: skip
    run.info["agreement_with_main"] = found["cos"]
    return run


@torch.no_grad()
def first_view_renders(
    model: ocdwrap.OCDModel, data: SceneData, true_delta: torch.Tensor, seed: int
) -> dict[str, torch.Tensor]:
    """Test view 0 rendered by the base, by OCD (one draw), by the overfit, and the truth."""
    pose = data.test_poses[:1].to(model.device)
    with model.disable_adapter():
        base = model(pose)
    with model.sampling(seed=seed):
        ocd = model(pose)
    with model.use_deltas(FullDelta(true_delta.to(model.device))):
        overfit = model(pose)
    out = {"truth": data.test_images[0], "base": base[0], "OCD": ocd[0], "overfit": overfit[0]}
    return {k: v.detach().float().cpu().clamp(0, 1) for k, v in out.items()}


def run_seed(args: Any, seed: int, data: SceneData, res: Results, workdir: str) -> dict:
    """Every row of one scene and seed; returns the renders of test view 0."""
    dev, task = args.device, ImageTask()
    info: dict[str, Any] = {}
    res.info[seed] = info
    log(
        f"{data.name} seed {seed}: training TinyNeRF, {args.iterations} iterations of {args.rays} rays"
    )
    torch.manual_seed(seed)
    base = TinyNeRF(data.size, data.focal, samples=args.samples, background=data.background)
    base = base.to(dev)
    info["base_training"] = train_nerf(
        base, data, lr=args.lr, rays=args.rays, seed=seed, iterations=args.iterations
    )
    log(f"  {info['base_training']}")
    loaders = {
        "train": tensor_loader(
            data.train_poses.to(dev), data.train_images.to(dev), args.view_batch
        ),
        "test": tensor_loader(data.test_poses.to(dev), data.test_images.to(dev), args.view_batch),
    }
    row, info["base_eval_s"] = timed(lambda: evaluate_module(base, loaders["test"], task, dev))
    res.add(seed, "base", row)
    log(f"  base: {row} ({info['base_eval_s']:.1f} s)")
    # no validation views: the report reads the test views (their images used for its bound
    # only), its probe fitted on the training views the generator learns from
    headroom_info(
        res, seed, base, LAYER, nerf_settings(args, seed)[0], loaders["test"], task,
        max_samples=args.headroom_samples, train_loader=loaders["train"], max_train_samples=None,
    )  # fmt: skip
    if args.headroom_only:
        return {}
    out_dir = os.path.join(workdir, f"{data.name}-s{seed}")
    run, renders = ocd_rows(args, seed, base, data, loaders, out_dir)
    add_run(res, seed, run)
    info["peak_rss_mb"] = peak_rss_mb()  # of the whole process so far (the 8 GiB bound)
    return renders


# --- notes, figure ---------------------------------------------------------------------------
def table_notes(res: Results, args: Any, data: SceneData) -> list[str]:
    base_p, over_p, ocd_p = (float(v) for v in PAPER[data.name])
    out = notes.gap_notes(res, "mse", {"ocd": (base_p - ocd_p) / (base_p - over_p), "ocd_k": None})
    out += notes.other_gaps_note(
        res,
        "mse",
        (
            "compute_matched",
            "global",
            "full_unet",
            "regression",
            "nearest",
            "probe",
            "overfit_rank",
        ),
    )
    out += notes.compare_note(res)
    out += notes.headroom_note(res)
    infos = list(res.info.values())
    bt = [i["base_training"] for i in infos if "base_training" in i]
    if bt:
        out.append(
            f"base: TinyNeRF, Adam {args.lr:g} (100-step warm-up), {args.iterations} iterations of {args.rays} random "
            f"training rays, {args.samples} stratified depth samples: "
            f"{[round(b['seconds']) for b in bt]} s, final ray MSE {[round(b['final_ray_mse'], 4) for b in bt]}"
        )
    cm = [i["compute_matched"] for i in infos if "compute_matched" in i]
    if cm:
        out.append(
            f"compute-matched: the base trained further with its own recipe (fresh Adam {args.lr:g}, "
            f"{args.rays} rays) for {[round(c['seconds']) for c in cm]} s (= OCD collection + fit "
            f"wall time), {[c['iterations'] for c in cm]} iterations"
        )
    out += notes.ocd_note(res)
    out += notes.agreement_note(res)
    energy = [i["ocd"]["true_delta_rank_energy"] for i in infos if "ocd" in i]
    if energy:
        out.append(
            "overfit-on-test deltas of fc1 are not rank one: share of their squared norm in the top r "
            "singular values, r = " + ", ".join(f"{r}: {fmt(energy, r)}" for r in energy[0])
        )
    times = [i["ocd"]["overfit_test_s"] for i in infos if "overfit_test_s" in i.get("ocd", {})]
    if times:
        out.append(
            "one overfit of the test views (for the truncated-rank row, the renders and the "
            f"agreement) per seed: {[round(t, 1) for t in times]} s; each shared row's build and "
            "prediction time are in the comparison of the JSON"
        )
    out.append(
        f"scene: benchmarks.scenes '{data.name}' (procedural stand-in, not the Blender scene), "
        f"{len(data.train_poses)} training / {len(data.test_poses)} test views, {data.size} x "
        f"{data.size} px, focal {data.focal:g}; rendered in {data.seconds:.0f} s"
        + (" (read from the cache)" if data.cached else "")
    )
    full = [i["ocd"]["full_unet"] for i in infos if "full_unet" in i.get("ocd", {})]
    if full:
        out.append(
            f"full-matrix UNet row: channels {tuple(args.unet_channels)}, fit batch 16, seeds "
            f"{[s for s, i in res.info.items() if 'full_unet' in i.get('ocd', {})]}, its own "
            f"collection of the same views: collect {[round(f['collect_s']) for f in full]} s, "
            f"fit {[round(f['fit_s']) for f in full]} s (not counted in the compute-matched time); "
            "cosine of its deltas with the overfit-on-test deltas "
            + str(
                [
                    round(i["ocd"]["agreement"]["full_unet"]["cos"], 3)
                    for i in infos
                    if "full_unet" in i.get("ocd", {}).get("agreement", {})
                ]
            )
        )
    out.append(
        f"settings: OCD on {LAYER} (128 × 63), delta={args.delta}"
        + (
            f" (UNet channels {tuple(args.unet_channels)})"
            if args.delta == "full"
            else f" (rank {args.delta_rank}, MLP denoiser)"
        )
        + f"; conditioning: the base render read channels-last, pooled to {args.output_grid} × "
        f"{args.output_grid} cells per colour (OCDConfig(output_layout='channels_last', "
        f"output_grid={args.output_grid}))"
        + f", overfit Adam {OVERFIT_LR:g} × {OVERFIT_STEPS} on the whole-image MSE, all {len(data.train_poses)} "
        f"training views collected, {args.fit_steps} fit steps, K={args.draws}, {args.samples} fixed depth "
        "samples per ray at evaluation; PSNR = -10 log10(mean test MSE); paper: Table 3, real Blender scenes"
    )
    return out


def fmt(energy: list[dict[str, float]], r: str) -> str:
    return fmt_mean_sd([100 * e[r] for e in energy], ".1f") + " %"


def plot_views(renders: dict[str, torch.Tensor], path: str, title: str) -> str:
    """Base / OCD / overfit / truth renders of one test view side by side (the paper's Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["base", "OCD", "overfit", "truth"]
    fig, axes = plt.subplots(1, 4, figsize=(9, 2.8))
    for ax, key in zip(axes, order):
        img = renders[key]
        ax.imshow(img.numpy())
        mse = float((img - renders["truth"]).pow(2).mean())
        ax.set_title(key if key == "truth" else f"{key}\nMSE {mse:.4f}", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- merging runs ------------------------------------------------------------------------------
def merge(paths: list[str], command: str) -> dict[str, Any]:
    """One benchmark JSON from the JSONs of several runs (e.g. the seeds of a scene run by two
    processes): :func:`benchmarks.cli.merge_runs` over scenes."""
    return cli.merge_runs(
        paths, command, benchmark="nerf", parts_setting="scenes", part_value=str,
        make_part=lambda args, name: make_part(args, name, None),
    )  # fmt: skip


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> Any:
    p = cli.base_parser(MODULE, __doc__, seeds=(0,))
    for action in p._actions:  # this benchmark's layer sees many points per view: no rank one
        if action.dest == "delta":
            action.choices = ["full", "lowrank"]
            action.help = "lowrank (default; plus a full-matrix UNet row) or full"
    p.set_defaults(overfit_lr=OVERFIT_LR)
    p.add_argument("--scenes", nargs="+", choices=list(SCENES), default=["lego"])
    p.add_argument(
        "--delta-rank", type=int, default=4, help="rank r of lowrank / the truncated row"
    )
    p.add_argument("--size", type=int, default=32, help="pixels per side of every view")
    p.add_argument("--samples", type=int, default=16, help="depth samples per ray")
    p.add_argument("--iterations", type=int, default=2000, help="base training iterations")
    p.add_argument("--rays", type=int, default=512, help="random rays per training iteration")
    p.add_argument("--lr", type=float, default=5e-3, help="base training Adam lr")
    p.add_argument("--train-views", type=int, default=100, help="training views (all collected)")
    p.add_argument("--test-views", type=int, default=25, help="held-out views scored")
    p.add_argument("--view-batch", type=int, default=5, help="views per collect / eval batch")
    p.add_argument(
        "--unet-channels",
        type=int,
        nargs="+",
        default=list(UNET_CHANNELS),
        help="channels of the full-matrix UNet (its own row, or the main rows with --delta full)",
    )
    p.add_argument(
        "--full-unet-seeds",
        type=int,
        nargs="*",
        default=None,
        help="seeds that also get the full-matrix UNet row (its own collection and fit, about as "
        "long as the rest of a seed on a CPU); default: every seed",
    )
    p.add_argument(
        "--output-grid",
        type=int,
        default=OUTPUT_GRID,
        help="the base render pooled to this many cells per side per colour (OCDConfig.output_grid)",
    )
    p.add_argument(
        "--cache-dir", default=None, help="scene cache (default ~/.cache/ocdwrap/scenes)"
    )
    cli.add_merge_option(p, "scenes")
    args = p.parse_args(argv)
    if cli.merge_requested(p, args):
        return args
    if args.smoke:
        args.seeds, args.scenes = args.seeds[:1], args.scenes[:1]
        args.size, args.samples, args.iterations, args.rays = 32, 16, 200, 256
        args.train_views, args.test_views, args.view_batch = 10, 2, 5  # 10: the probe's folds
        args.fit_steps, args.draws = args.fit_steps or 10, 2
    if args.overfit_lr != OVERFIT_LR:
        p.error(
            f"--overfit-lr: this benchmark keeps the authors' TinyNeRF overfit (Adam {OVERFIT_LR:g} x 10)"
        )
    args.fit_steps = args.fit_steps or (20000 if args.paper else 400)
    args.delta = args.delta or "lowrank"
    if args.delta_rank < 1:
        p.error(f"--delta-rank must be >= 1, got {args.delta_rank}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cmd = cli.command(MODULE, argv)
    if args.merge:
        return cli.merge_main(args, merge(args.merge, cmd))
    workdir = cli.setup(args)
    t0 = time.perf_counter()
    return cli.run_parts(
        args, (make_part(args, name, workdir) for name in args.scenes), benchmark="nerf",
        module=MODULE, argv=argv, t0=t0,
    )  # fmt: skip


def make_part(args: Any, name: str, workdir: str | None) -> cli.Part:
    """The table of scene ``name`` (the scene rendered or read from the cache)."""
    data = load_scene(
        name, size=args.size, n_train=args.train_views, n_test=args.test_views,
        directory=args.cache_dir,
    )  # fmt: skip
    log(
        f"{name}: {'read from the cache' if data.cached else 'rendered'} ({data.path}), {data.seconds:.1f} s"
    )
    unet = tuple(args.unet_channels) if args.delta == "lowrank" else None
    res = Results(f"nerf-{name}", rows_for(name, args.delta_rank, unet), METRICS)
    title = f"TinyNeRF / {name} (procedural stand-in), OCD on {LAYER} (128×63)"
    return cli.Part(
        name, res, title,
        run_seed=lambda seed: run_seed(args, seed, data, res, workdir),
        notes=lambda: table_notes(res, args, data),
        figure=lambda seed, renders: plot_views(
            renders, os.path.join(args.plots, f"nerf-{name}-views.png"),
            f"{title}: test view 0, seed {seed}",
        ),
    )  # fmt: skip


if __name__ == "__main__":
    main()
