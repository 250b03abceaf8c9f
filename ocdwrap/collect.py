"""Collection: overfit the target layer on every training sample alone, vectorized over a batch.

For a batch of B samples, each sample b gets its own weight W + delta_b (delta_b starts at 0)
and its own optimizer state. The model runs once on the whole batch with the dynamic layer,
and the gradient of the *sum* of per-sample losses with respect to the stacked deltas is, for
every b, the gradient of sample b's loss alone (samples do not interact in eval mode). Adam and
SGD act element-wise, so K steps on the batch equal K steps on each sample separately — at
the cost of K batched forward/backward passes instead of K·B single-sample ones.

:func:`overfit_one` is the plain one-sample-at-a-time loop (the paper's protocol), kept as the
reference the tests and the speed benchmark compare against.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .batches import (
    batch_size,
    call_model,
    check_inputs,
    check_loss_is_sum,
    explain_device_dtype_errors,
    index_batch,
    map_tensors,
    per_sample_loss,
    read_output,
    split_batch,
    to_device,
)
from .capture import Conditioning, build_conditioning
from .config import OCDConfig
from .errors import CollectionExistsError, EmptyDataError, NonFiniteError
from .io import atomic_save_tensors, atomic_write_json, tensor_fingerprint
from .layer import FullDelta, OutputProbe
from .model import OCDModel, _attention_mask
from .split import split_for
from .store import MANIFEST_NAME, STORE_FORMAT, STORE_VERSION, DeltaStore, shard_name

logger = logging.getLogger("ocdwrap")

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class OverfitResult:
    """Deltas of one batch. ``delta``: (B, *weight.shape) float32; ``finite``: (B,) bool."""

    delta: torch.Tensor
    cond: Conditioning
    loss_before: torch.Tensor  # (B,) or () when the loss is not per sample
    loss_after: torch.Tensor
    finite: torch.Tensor
    layer_input: torch.Tensor  # the raw (unpooled) layer input of the base pass


def _adam_update(delta, grad, m, v, step, lr, betas, eps, denom=None) -> None:
    # mirrors torch.optim.Adam (no weight decay, no amsgrad), element-wise; ``denom`` is a
    # reusable buffer (fresh large tensors cost page faults on every step)
    b1, b2 = betas
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1 = 1 - b1**step
    bc2 = 1 - b2**step
    denom = denom if denom is not None else torch.empty_like(v)
    if eps > 0:
        # sqrt(0) takes a slow path on some CPUs (x86 here: 5-8x), and a ReLU input makes whole
        # columns of v zero. Where v < tiny, m is 0 too (or the step is far below eps), so the
        # update is the same with v raised to the smallest normal float.
        torch.clamp(v, min=torch.finfo(v.dtype).tiny, out=denom).sqrt_()
    else:
        torch.sqrt(v, out=denom)
    denom.div_(math.sqrt(bc2)).add_(eps)
    delta.addcdiv_(m, denom, value=-lr / bc1)


def _adam_outer_update(delta, outer, m, v, step, lr, betas, eps, buf) -> None:
    """Adam on per-sample deltas whose gradient is the outer product g xᵀ, without forming it.

    While only the layer trains its input x is fixed, so Adam's moments are m = M xᵀ and
    v = V (x²)ᵀ for the (B, out) vectors M and V, and the step is
    -lr/bc1 · M_o x_i / (sqrt(V_o / bc2) |x_i| + eps): the same as :func:`_adam_update` up to
    rounding, with one (B, out, in) buffer instead of the gradient and three moment matrices.
    ``outer`` = (g (B, out), x (B, in)); ``m`` and ``v`` hold M and V.
    """
    g, x = outer
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1 = 1 - b1**step
    bc2 = 1 - b2**step
    scale = v.sqrt().div_(math.sqrt(bc2))  # (B, out)
    torch.mul(scale.unsqueeze(2), x.abs().unsqueeze(1), out=buf).add_(eps)  # Adam's denominator
    torch.div(x.unsqueeze(1), buf, out=buf)  # x_i / denominator_oi
    delta.addcmul_(buf, m.unsqueeze(2), value=-lr / bc1)


def overfit_batch(
    model: OCDModel,
    inputs: Any,
    target: Any,
    loss_fn: LossFn,
    *,
    config: OCDConfig | None = None,
    check_loss: bool = False,
) -> OverfitResult:
    """Overfit the target layer on each sample of one batch separately (vectorized).

    Returns the per-sample deltas, the conditioning captured in the first (delta = 0) pass,
    and the losses before and after. The base model is put in eval mode for the call.

    Example:
        >>> res = overfit_batch(model, x, y, nn.CrossEntropyLoss(reduction="none"))
        >>> res.delta.shape      # (B, out, in)
    """
    cfg = config or model.config
    layer = model.target_layer
    W = layer.weight
    B = batch_size(inputs)
    adam = cfg.overfit_optimizer == "adam"
    # Linear: d loss / d output comes from a zero probe added to the layer's output, and the
    # weight gradient g xᵀ is built here (for one input vector per sample, never formed: see
    # _adam_outer_update). Conv2d: autograd differentiates the stacked deltas directly.
    probed = layer.kind == "linear"
    delta = torch.zeros((B, *W.shape), dtype=torch.float32, device=W.device)
    delta.requires_grad_(not probed)
    m = v = buf = None  # optimizer state, made once the gradient's structure is known
    mask = _attention_mask((inputs,), inputs if isinstance(inputs, dict) else {})
    was_training = model.base_model.training
    model.base_model.eval()
    cond = None
    loss_before = None
    raw_input = None
    try:
        # only the target layer changes between the K+1 passes: where the model traces, the part
        # upstream of it runs once (ocdwrap.split) and each pass runs the layer and what follows
        split = boundary = None
        if isinstance(inputs, torch.Tensor):
            split = split_for(model, (inputs,), {}, lambda: call_model(model.base_model, inputs))
        if split is not None:
            with torch.no_grad(), explain_device_dtype_errors(model.base_model, inputs):
                boundary = split.prefix((inputs,), {})

        def run() -> Any:
            if split is None:
                return call_model(model.base_model, inputs)
            with explain_device_dtype_errors(model.base_model, inputs):
                return split.suffix(boundary)

        with torch.enable_grad():
            for step in range(cfg.overfit_steps + 1):
                spec = (
                    OutputProbe(FullDelta(delta) if step else None) if probed else FullDelta(delta)
                )
                # the spec stays set through backward: gradient checkpointing recomputes the forward
                with model.use_deltas(spec):
                    if step == 0:
                        with model._capture.session() as records:
                            out = run()
                    else:
                        out = run()
                    pred = read_output(out)
                    losses = per_sample_loss(loss_fn, pred, target, B)
                    if step == 0:
                        cond = build_conditioning(records, pred, layer.kind, B, mask)
                        raw_input = records[0][0].detach()
                        loss_before = losses.detach()
                        if check_loss and losses.dim() == 0:
                            check_loss_is_sum(loss_fn, pred.detach(), target, losses)
                    if step == cfg.overfit_steps:
                        loss_after = losses.detach()
                        break
                    (grad,) = torch.autograd.grad(losses.sum(), spec.probe if probed else delta)
                with torch.no_grad():
                    outer = None  # (g, x) when the weight gradient is the outer product g xᵀ
                    if probed:
                        xs = raw_input.reshape(B, -1, raw_input.shape[-1]).float()  # (B, T, in)
                        g = grad.reshape(B, -1, grad.shape[-1]).float()  # (B, T, out)
                        if xs.shape[1] == 1:
                            outer = (g[:, 0], xs[:, 0])
                        else:  # token sequences: the sum over positions of g_t x_tᵀ
                            grad = torch.bmm(g.transpose(1, 2), xs)  # (B, out, in)
                    if not adam:
                        if outer is not None:
                            delta.baddbmm_(
                                outer[0].unsqueeze(2), outer[1].unsqueeze(1), alpha=-cfg.overfit_lr
                            )
                        else:
                            delta.add_(grad, alpha=-cfg.overfit_lr)
                        continue
                    if buf is None:
                        buf = torch.empty_like(delta)
                        shape = outer[0].shape if outer is not None else delta.shape
                        m = torch.zeros(shape, dtype=torch.float32, device=delta.device)
                        v = torch.zeros_like(m)
                    update = _adam_outer_update if outer is not None else _adam_update
                    update(
                        delta,
                        outer if outer is not None else grad,
                        m,
                        v,
                        step + 1,
                        cfg.overfit_lr,
                        cfg.adam_betas,
                        cfg.adam_eps,
                        buf,
                    )
    finally:
        model.base_model.train(was_training)
    delta = delta.detach()
    flat = delta.reshape(B, -1)  # amax/amin propagate NaN and need no (B, out, in) temporary
    finite = torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1))
    for t in (loss_before, loss_after):
        finite &= torch.isfinite(t) if t.dim() else torch.isfinite(t).expand(B)
    for t in (cond.layer_input, cond.layer_output, cond.model_output):
        finite &= torch.isfinite(t).all(1)
    return OverfitResult(delta, cond, loss_before, loss_after, finite, raw_input)


def overfit_one(
    model: OCDModel, inputs: Any, target: Any, loss_fn: LossFn, *, config: OCDConfig | None = None
) -> torch.Tensor:
    """The reference loop: overfit one sample at a time with ``torch.optim`` on a weight copy.

    Returns (B, *weight.shape) deltas. Slow by design (the paper's protocol); used to check
    :func:`overfit_batch` and as the speed benchmark's baseline.
    """
    cfg = config or model.config
    layer = model.target_layer.base_layer
    B = batch_size(inputs)
    out = []
    was_training = model.base_model.training
    model.base_model.eval()
    try:
        with model.disable_ocd():
            for b in range(B):
                w0 = layer.weight.detach().clone()
                w = torch.nn.Parameter(w0.clone())
                if cfg.overfit_optimizer == "adam":
                    opt = torch.optim.Adam(
                        [w], lr=cfg.overfit_lr, betas=cfg.adam_betas, eps=cfg.adam_eps
                    )
                else:
                    opt = torch.optim.SGD([w], lr=cfg.overfit_lr)
                xb = index_batch(inputs, slice(b, b + 1))
                yb = index_batch(target, slice(b, b + 1))
                original = layer._parameters["weight"]
                layer._parameters["weight"] = w  # this sample's own weight copy
                try:
                    for _ in range(cfg.overfit_steps):
                        opt.zero_grad()
                        with torch.enable_grad():
                            pred = read_output(call_model(model.base_model, xb))
                            per_sample_loss(loss_fn, pred, yb, 1).sum().backward()
                        opt.step()
                finally:
                    layer._parameters["weight"] = original
                out.append((w.detach() - w0).float())
    finally:
        model.base_model.train(was_training)
    return torch.stack(out)


def top_singular_energy(delta: torch.Tensor, *, iters: int = 2, tol: float = 1e-6) -> torch.Tensor:
    """Fraction of each delta's energy in its top singular value, s1² / ‖Δ‖²_F, (B,).

    A zero delta gives 1. Power iteration on ΔᵀΔ (started from Δ's largest row) gives a lower
    bound a = ‖Δv‖² of s1²; with c = ‖ΔᵀΔv − a v‖ and b = ‖Δ‖²_F − a, s1² is at most the top
    eigenvalue of [[a, c], [c, b]]. Samples where that bracket is wider than ``tol``·‖Δ‖²_F
    (deltas far from rank one) get ``torch.linalg.svdvals``; the near-rank-one deltas of a Linear
    layer (DESIGN §4) need two matrix-vector products each instead of an SVD.
    """
    B = delta.shape[0]
    mats = delta.reshape(B, delta.shape[1], -1).float()  # (B, out, in)
    total = mats.square().sum((1, 2))  # (vector_norm's float32 sum is less exact here)
    rows = torch.linalg.vector_norm(mats, dim=2).argmax(1)  # (B,)
    v = mats[torch.arange(B, device=mats.device), rows].unsqueeze(1)  # (B, 1, in), row vectors
    for _ in range(iters):
        v = torch.bmm(torch.bmm(mats, v.transpose(1, 2)).transpose(1, 2), mats)  # vᵀΔᵀΔ
        v = v / v.norm(dim=2, keepdim=True).clamp_min(1e-30)
    w = torch.bmm(mats, v.transpose(1, 2))  # (B, out, 1)
    a = w.square().sum((1, 2))
    c = (torch.bmm(w.transpose(1, 2), mats) - a.view(B, 1, 1) * v).norm(dim=(1, 2))
    b = (total - a).clamp_min(0)
    upper = (a + b) / 2 + torch.sqrt(((a - b) / 2) ** 2 + c**2)
    frac = a / total.clamp_min(1e-30)
    loose = (upper - a > tol * total) & (total > 0)
    if bool(loose.any()):
        s = torch.linalg.svdvals(mats[loose])
        frac[loose] = s[:, 0] ** 2 / (s**2).sum(1).clamp_min(1e-30)
    return torch.where(total > 0, frac, torch.ones_like(frac))


def delta_scale(flat: torch.Tensor, normalization: str) -> torch.Tensor:
    """rho_s of each row of ``flat`` (B, numel): per-element std ("std") or root mean square ("rms")."""
    if normalization == "rms":
        return flat.square().mean(1).sqrt().clamp_min(1e-20)
    # per-element std in two passes: ~15x faster on CPU here than Tensor.std over dim 1
    return (flat - flat.mean(1, keepdim=True)).square().mean(1).sqrt().clamp_min(1e-20)


def rank1_right_factor(layer_input: torch.Tensor, optimizer: str) -> torch.Tensor:
    """The right factor v of a rank-one delta: the input for SGD, its sign for Adam (DESIGN §4)."""
    return layer_input.sign() if optimizer == "adam" else layer_input


def rank1_factors(
    delta: torch.Tensor, layer_input: torch.Tensor, optimizer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares u for delta ≈ u vᵀ given the right factor v; returns (u (B, out), v (B, in))."""
    v = rank1_right_factor(layer_input.float(), optimizer)
    u = torch.einsum("boi,bi->bo", delta.float(), v) / (v * v).sum(1, keepdim=True).clamp_min(1e-30)
    return u, v


def _identity(
    model: OCDModel, cfg: OCDConfig, store_full: bool, store_rank1: bool
) -> dict[str, Any]:
    return {
        "layer": model.layer_name,
        "layer_kind": model.layer_kind,
        "weight_shape": list(model.weight_shape),
        "fingerprint": model.layer_fingerprint(),
        "overfit_steps": cfg.overfit_steps,
        "overfit_optimizer": cfg.overfit_optimizer,
        "overfit_lr": cfg.overfit_lr,
        "adam_betas": list(cfg.adam_betas),
        "adam_eps": cfg.adam_eps,
        "delta_normalization": cfg.delta_normalization,
        "store_full": store_full,
        "store_rank1": store_rank1,
        "shard_size": cfg.shard_size,
    }


def _data_fingerprint(inputs: Any) -> str:
    found: list[torch.Tensor] = []
    map_tensors(inputs, lambda t: found.append(t) or t)
    return tensor_fingerprint(*(t[:4] for t in found))


def collect(
    model: OCDModel,
    data: Iterable,
    loss_fn: LossFn,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_samples: int | None = None,
    progress: bool = True,
) -> DeltaStore:
    """Overfit the target layer on every training sample and store the deltas on disk.

    Args:
        model: an :class:`OCDModel` (see :func:`ocdwrap.wrap`).
        data: batches ``(inputs, target)`` or HF dicts with ``"labels"``, in a fixed order
            (do not shuffle: resumption skips the samples already stored).
        loss_fn: ``loss_fn(prediction, target)`` -> per-sample losses (B,) or their sum.
        out_dir: collection directory. An interrupted collection there is resumed; one from
            another base model or config is refused unless ``overwrite=True``.
        max_samples: stop after this many samples.

    Returns:
        a :class:`DeltaStore` over ``out_dir``.

    Example:
        >>> store = ocdwrap.collect(model, train_loader, nn.CrossEntropyLoss(reduction="none"), "deltas/")
    """
    cfg = model.config
    out_dir = os.fspath(out_dir)
    is_linear = model.layer_kind == "linear"
    store_full = cfg.delta == "full"
    manifest_path = os.path.join(out_dir, MANIFEST_NAME)
    manifest: dict[str, Any] | None = None
    if os.path.exists(manifest_path):
        old = DeltaStore(out_dir).manifest
        # collections written before delta_normalization existed used "std"
        old_identity = {"delta_normalization": "std", **old["identity"]}
        same = old_identity == _identity(model, cfg, store_full, old["identity"]["store_rank1"])
        if not same and not overwrite:
            raise CollectionExistsError(
                f"{out_dir} already holds a collection from another base model or config "
                f"(layer {old['identity']['layer']!r}, fingerprint {old['identity']['fingerprint']}); "
                "it was left untouched. Use another out_dir, or pass overwrite=True to replace it."
            )
        if same:
            manifest = old
            damaged = DeltaStore(out_dir).first_damaged_shard()
            if damaged is not None:  # rebuild from the first missing or damaged shard on
                logger.warning(
                    "ocdwrap: shard %s in %s is missing or damaged; collecting again from sample %d.",
                    manifest["shards"][damaged]["file"],
                    out_dir,
                    manifest["shards"][damaged]["start"],
                )
                manifest["shards"] = manifest["shards"][:damaged]
                manifest["complete"] = False
            if manifest.get("complete") and (
                max_samples is None or len(DeltaStore(out_dir)) >= max_samples
            ):
                return DeltaStore(out_dir)
        else:
            for s in old["shards"]:
                p = os.path.join(out_dir, s["file"])
                if os.path.exists(p):
                    os.unlink(p)
            os.unlink(manifest_path)
    elif os.path.isdir(out_dir) and any(f.startswith("shard-") for f in os.listdir(out_dir)):
        if not overwrite:
            raise CollectionExistsError(
                f"{out_dir} holds shard files but no manifest; refusing to overwrite them. "
                "Use another out_dir, or pass overwrite=True."
            )
        for f in os.listdir(out_dir):
            if f.startswith("shard-"):
                os.unlink(os.path.join(out_dir, f))
    os.makedirs(out_dir, exist_ok=True)

    done = manifest["shards"][-1]["stop"] if manifest and manifest["shards"] else 0
    total = None
    try:
        total = len(data.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        pass
    if max_samples is not None:
        total = min(total, max_samples) if total is not None else max_samples

    buffer: dict[str, list[torch.Tensor]] = {}
    buffered = 0
    position = 0
    # skipped samples are counted per shard (those before its stop), so a resumed run that
    # revisits samples after the last shard does not count them twice
    skipped = sum(sh.get("skipped", 0) for sh in manifest["shards"]) if manifest else 0
    skipped_at: list[int] = []  # positions skipped in this run and not yet in a shard's count
    checked_loss = False
    bar = tqdm(
        total=total, initial=done, desc="ocdwrap collect", unit="sample", disable=not progress
    )
    device = model.device

    def flush(final: bool) -> None:
        nonlocal buffered, buffer, manifest, skipped, skipped_at
        while buffered >= cfg.shard_size or (final and buffered > 0):
            n = min(buffered, cfg.shard_size)
            joined = {k: torch.cat(v) for k, v in buffer.items()}  # copies: no shared storage
            tensors = {k: t[:n] for k, t in joined.items()}  # one copy per key, not two
            # the per-batch pieces are released before the shard is written (lower peak memory)
            buffer, buffered = {k: [t[n:]] for k, t in joined.items()}, buffered - n
            shards = manifest["shards"]
            if not shards:  # a manifest first, so a crash never leaves shards without one
                atomic_write_json(manifest_path, manifest)
            start = shards[-1]["stop"] if shards else 0
            stop = int(tensors["index"][-1]) + 1
            name = shard_name(len(shards))
            atomic_save_tensors(os.path.join(out_dir, name), tensors)
            n_skipped = sum(p < stop for p in skipped_at)
            skipped_at = [p for p in skipped_at if p >= stop]
            skipped += n_skipped
            shards.append(
                {"file": name, "count": n, "start": start, "stop": stop, "skipped": n_skipped}
            )
            manifest["skipped"] = skipped
            atomic_write_json(manifest_path, manifest)

    first = True
    for batch in data:
        inputs, target = split_batch(batch)
        inputs, target = to_device(inputs, device), to_device(target, device)
        B = batch_size(inputs)
        if B == 0:
            continue
        if first:
            first = False
            fp = _data_fingerprint(inputs)
            if manifest is None:
                manifest = {
                    "format": STORE_FORMAT,
                    "version": STORE_VERSION,
                    "identity": None,
                    "data_fingerprint": fp,
                    "config": cfg.to_dict(),
                    "shards": [],
                    "skipped": 0,
                    "complete": False,
                }
            elif manifest["data_fingerprint"] != fp:
                raise CollectionExistsError(
                    f"{out_dir} holds a partial collection made from different data (its first batch "
                    "differs: a shuffled loader?). Resume with the same data in the same order, or "
                    "pass overwrite=True to start again."
                )
        lo, hi = position, position + B
        position = hi
        if max_samples is not None and lo >= max_samples:
            break
        if hi <= done:
            continue
        keep_from = max(done - lo, 0)
        keep_to = B if max_samples is None else min(B, max_samples - lo)
        check_inputs(inputs, device)
        # always the whole batch, even when only part of it is kept (a resume point or max_samples
        # inside it): kernels may round differently for another batch size, and a resumed
        # collection must store exactly what an uninterrupted one stores
        res = overfit_batch(model, inputs, target, loss_fn, config=cfg, check_loss=not checked_loss)
        checked_loss = True
        in_range = torch.zeros(B, dtype=torch.bool, device=res.finite.device)
        in_range[keep_from:keep_to] = True
        ok = res.finite & in_range
        bad = ~res.finite & in_range
        if bool(bad.any()):
            if cfg.on_nonfinite == "raise":
                raise NonFiniteError(
                    f"NaN/Inf in inputs, losses or deltas for samples {bad.nonzero().flatten().add(lo).tolist()[:10]}; "
                    "fix the data or pass OCDConfig(on_nonfinite='skip') to skip and count them."
                )
            skipped_at += bad.nonzero().flatten().add(lo).tolist()
        idx = ok.nonzero().flatten()
        if manifest["identity"] is None:
            vector_input = is_linear and res.layer_input.dim() == 2
            if cfg.delta == "rank1" and not vector_input:
                from .errors import UnsupportedLayerError

                raise UnsupportedLayerError(
                    "delta='rank1' needs a Linear target on vector inputs (one input vector per sample); "
                    f"this layer is a {model.layer_kind} whose input has shape {tuple(res.layer_input.shape)}, "
                    "so its delta has higher rank. Use delta='full'."
                )
            manifest["identity"] = _identity(model, cfg, store_full, vector_input)
            manifest["dims"] = {
                "cond_in": res.cond.layer_input.shape[1],
                "cond_act": res.cond.layer_output.shape[1],
                "cond_out": res.cond.model_output.shape[1],
            }
            keys = ["index", "rho", "cond_in", "cond_act", "cond_out"]
            keys += (["energy"] if is_linear else []) + (["delta"] if store_full else [])
            keys += ["u", "v"] if vector_input else []
            manifest["keys"] = keys
        ident = manifest["identity"]
        n = int(idx.numel())
        if n == 0:  # nothing of this batch is kept
            bar.update(keep_to - keep_from)
            continue
        # per-sample rows over the whole batch (same arithmetic whatever is kept), then the kept ones
        delta = res.delta
        if not bool(res.finite.all()):  # rows dropped below; zeros keep the SVD path finite
            delta = delta.masked_fill(~res.finite.view(B, *([1] * (delta.dim() - 1))), 0.0)
        flat = delta.reshape(B, -1)
        rho_all = delta_scale(flat, cfg.delta_normalization)
        rows = {
            "index": torch.arange(lo, lo + B, dtype=torch.int64),
            "rho": rho_all,
            **res.cond.as_dict(),
        }
        if is_linear:
            rows["energy"] = top_singular_energy(delta)
        if store_full:
            rows["delta"] = (delta / rho_all.view(B, *([1] * (delta.dim() - 1)))).reshape(
                B, delta.shape[1], -1
            )
        if ident["store_rank1"]:
            u, v = rank1_factors(delta, res.layer_input, cfg.overfit_optimizer)
            rows["u"], rows["v"] = u / rho_all.unsqueeze(1), v
        if n < B:
            rows = {k: t[idx.to(t.device)] for k, t in rows.items()}
        for k, t in rows.items():
            buffer.setdefault(k, []).append(t.detach().cpu())
        buffered += n
        bar.update(keep_to - keep_from)
        flush(final=False)
        if max_samples is not None and position >= max_samples:
            break
    bar.close()
    if manifest is None or (manifest["identity"] is None and not manifest["shards"]):
        raise EmptyDataError(
            "collect() got no samples from the data loader; check that it is not empty."
        )
    flush(final=True)
    manifest["skipped"] = skipped + len(skipped_at)
    manifest["summary"] = _summary(out_dir, manifest)
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return DeltaStore(out_dir)


def _summary(out_dir: str, manifest: dict[str, Any]) -> dict[str, Any]:
    store = DeltaStore.__new__(DeltaStore)
    store.directory, store.manifest = out_dir, manifest
    keys = ["rho"] + (["energy"] if "energy" in manifest["keys"] else [])
    data = store.load(keys)
    rho = data["rho"].double()
    summary: dict[str, Any] = {
        "count": int(rho.numel()),
        "skipped_nonfinite": int(manifest.get("skipped", 0)),
        "rho_mean": float(rho.mean()) if rho.numel() else None,
        "rho_cv": float(rho.std() / rho.mean()) if rho.numel() > 1 else None,
    }
    if "energy" in data and data["energy"].numel():
        e = data["energy"].double()
        summary["top_singular_energy"] = {
            "mean": float(e.mean()),
            "min": float(e.min()),
            "median": float(e.median()),
            "p05": float(e.quantile(0.05)) if e.numel() > 1 else float(e.min()),
        }
    return summary


def clear_collection(out_dir: str | os.PathLike) -> None:
    """Delete a collection directory written by :func:`collect` (and nothing else in it)."""
    out_dir = os.fspath(out_dir)
    store = DeltaStore(out_dir)
    for p in store.shard_paths():
        if os.path.exists(p):
            os.unlink(p)
    os.unlink(os.path.join(out_dir, MANIFEST_NAME))
    if not os.listdir(out_dir):
        shutil.rmtree(out_dir)
