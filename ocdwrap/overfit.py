"""Overfitting the target layer on each sample of a batch alone, vectorized over the batch.

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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .batches import (
    batch_size,
    call_model,
    check_loss_is_sum,
    explain_device_dtype_errors,
    index_batch,
    per_sample_loss,
    read_output,
)
from .capture import Conditioning, attention_mask, build_conditioning, conditioning_options
from .config import OCDConfig
from .deltas import FullDelta, LowRankDelta, OutputProbe, lowrank_factors
from .errors import ConfigError
from .model import OCDModel
from .split import split_for

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass
class OverfitResult:
    """Deltas of one batch. ``delta``: (B, *weight.shape) float32; ``finite``: (B,) bool."""

    delta: torch.Tensor
    cond: Conditioning
    loss_before: torch.Tensor  # (B,) or () when the loss is not per sample
    loss_after: torch.Tensor | None  # None when overfit_batch(loss_after=False)
    finite: torch.Tensor
    layer_input: torch.Tensor  # the raw (unpooled) layer input of the base pass
    # (B,) float32: the sum of each delta's elements, taken by the finite check (collect reuses it)
    delta_sum: torch.Tensor | None = None

    def spec(self, rank: int | None = None) -> FullDelta | LowRankDelta:
        """The overfit deltas as a spec for :meth:`OCDModel.use_deltas`: the full matrices, or
        with ``rank`` each one's best rank-``rank`` approximation (top SVD factors, as a
        ``delta="lowrank"`` collection stores them).

        Example:
            >>> res = ocdwrap.overfit_batch(model, x, y, loss_fn)
            >>> with model.use_deltas(res.spec()):          # the overfit-on-(x, y) model
            ...     pred = model(x)
            >>> res.spec(rank=4).full().shape               # (B, out, in'), rank 4 each
        """
        if rank is None:
            return FullDelta(self.delta)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(
                f"OverfitResult.spec(rank={rank!r}): rank counts factor pairs, so it must be an "
                "integer >= 1 (or None for the full matrices)."
            )
        u, s, v, _ = lowrank_factors(self.delta, rank)
        return LowRankDelta(u, s, v)


# the closed-form Adam step of a Linear layer on vector inputs, as collect() records it in a
# collection's identity; collections made by 0.1.0 carry no record and used ADAM_OUTER_FORMULA_V1
ADAM_OUTER_FORMULA = "m/(sqrt(v)*sign(x)+eps/x)"
ADAM_OUTER_FORMULA_V1 = "m*x/(sqrt(v)*|x|+eps)"
_ADAM_OUTER_FORMULAS = (ADAM_OUTER_FORMULA, ADAM_OUTER_FORMULA_V1)


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


def _adam_outer_update(
    delta, outer, m, v, step, lr, betas, eps, buf, formula=ADAM_OUTER_FORMULA
) -> None:
    """Adam on per-sample deltas whose gradient is the outer product g xᵀ, in closed form.

    While only the layer trains its input x is fixed, so Adam's moments are m = M xᵀ and
    v = V (x²)ᵀ for the (B, out) vectors M and V, and each update element is
    -lr/bc1 · M_o x_i / (sqrt(V_o / bc2) |x_i| + eps): no gradient and no (B, out, in) moment
    is ever formed. It is evaluated as -lr/bc1 · M_o / (D_o sign(x_i) + eps / x_i) with
    D = sqrt(V / bc2) (the same value: numerator and denominator times 1 / x_i; x_i = 0 gives
    eps / 0 = inf and an exact 0), two passes over one (B, out, in) buffer per step instead of
    four. It rounds differently from the element-wise mirror of ``torch.optim.Adam``
    (:func:`_adam_update`; the same to about 1e-6 relative, tests/test_overfit_closed_form.py),
    so ``collect`` records it in the collection's identity (:data:`ADAM_OUTER_FORMULA`) and
    never resumes a collection made with the other. ``outer`` = (g (B, out), x (B, in)), with
    x's ``sign`` and ``eps / x`` precomputed when given as a third and fourth element; ``m``
    and ``v`` hold M and V. eps = 0 (where eps / x would be 0 / 0), or ``formula`` =
    :data:`ADAM_OUTER_FORMULA_V1` (to continue a collection made by 0.1.0), evaluates the step
    as written, in the earlier rounding.
    """
    g, x = outer[:2]
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    bc1 = 1 - b1**step
    bc2 = 1 - b2**step
    scale = v.sqrt().div_(math.sqrt(bc2))  # (B, out)
    if eps <= 0 or formula == ADAM_OUTER_FORMULA_V1:
        torch.mul(scale.unsqueeze(2), x.abs().unsqueeze(1), out=buf).add_(eps)
        torch.div(x.unsqueeze(1), buf, out=buf)
        delta.addcmul_(buf, m.unsqueeze(2), value=-lr / bc1)
        return
    sign, eps_over_x = outer[2:] if len(outer) == 4 else _input_terms(x, eps)
    torch.addcmul(eps_over_x.unsqueeze(1), scale.unsqueeze(2), sign.unsqueeze(1), out=buf)
    delta.addcdiv_(m.unsqueeze(2), buf, value=-lr / bc1)


def _input_terms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """sign(x) and eps / x (inf where x = 0) for :func:`_adam_outer_update`, (B, in) each."""
    return x.sign(), torch.full_like(x, eps).div_(x)


def _buffer(
    workspace: dict | None, name: str, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape``: the ``workspace``'s buffer ``name`` when
    one is given (made on first use, reused while large enough), else a fresh one.

    A fresh (B, out, in) tensor per batch costs a page fault per 4 KiB: glibc serves blocks
    that large with ``mmap`` or trims them off the heap when they are freed, so every batch
    faulted the same pages in again (LeNet5's fc2 at batch 256: 10 MB, 2,500 faults, per
    tensor per batch). ``collect`` passes one workspace for its whole run.
    """
    if workspace is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    n, t = math.prod(shape), workspace.get(name)
    if t is None or t.numel() < n or t.device != torch.device(device):
        t = workspace[name] = torch.empty(n, dtype=torch.float32, device=device)
    return t[:n].view(shape)


class _PerSampleOptimizer:
    """Adam or SGD on the stacked per-sample deltas (B, *weight.shape), element-wise.

    ``step`` takes the weight gradient either as the outer product (g (B, out), x (B, in)) of
    a Linear layer on one input vector per sample (never formed), or as the full (B, ...) tensor.
    """

    def __init__(
        self, delta: torch.Tensor, cfg: OCDConfig, formula: str, workspace: dict | None = None
    ) -> None:
        self.delta, self.cfg, self.formula, self.workspace = delta, cfg, formula, workspace
        self.m = self.v = self.buf = None  # made once the gradient's structure is known
        self.terms: tuple[torch.Tensor, torch.Tensor] | None = None  # sign(x), eps / x

    @torch.no_grad()
    def step(self, grad: torch.Tensor | tuple[torch.Tensor, torch.Tensor], step: int) -> None:
        cfg, delta = self.cfg, self.delta
        outer = isinstance(grad, tuple)
        if cfg.overfit_optimizer != "adam":
            if outer:
                delta.baddbmm_(grad[0].unsqueeze(2), grad[1].unsqueeze(1), alpha=-cfg.overfit_lr)
            else:
                delta.add_(grad, alpha=-cfg.overfit_lr)
            return
        if self.buf is None:
            self.buf = _buffer(self.workspace, "buf", delta.shape, delta.device)
            shape = grad[0].shape if outer else delta.shape
            self.m = torch.zeros(shape, dtype=torch.float32, device=delta.device)
            self.v = torch.zeros_like(self.m)
        args = (cfg.overfit_lr, cfg.adam_betas, cfg.adam_eps, self.buf)
        if not outer:
            _adam_update(delta, grad, self.m, self.v, step, *args)
            return
        if self.terms is None and cfg.adam_eps > 0:  # x is the same at every step
            self.terms = _input_terms(grad[1], cfg.adam_eps)
        outer_grad = (*grad, *(self.terms or ()))
        _adam_outer_update(delta, outer_grad, self.m, self.v, step, *args, self.formula)


def _linear_weight_gradient(
    grad_out: torch.Tensor, layer_input: torch.Tensor, B: int
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A Linear layer's per-sample weight gradient from d loss / d output and its input."""
    xs = layer_input.reshape(B, -1, layer_input.shape[-1]).float()  # (B, T, in)
    g = grad_out.reshape(B, -1, grad_out.shape[-1]).float()  # (B, T, out)
    if xs.shape[1] == 1:  # one input vector per sample: the outer product g xᵀ
        return g[:, 0], xs[:, 0]
    return torch.bmm(g.transpose(1, 2), xs)  # token sequences: sum over t of g_t x_tᵀ


def _pass_runner(model: OCDModel, inputs: Any) -> Callable[[], Any]:
    """One forward pass of the base model on ``inputs`` with the current deltas.

    Only the target layer changes between the K+1 passes: where the model traces, the part
    upstream of it runs once (ocdwrap.split) and each pass runs the layer and what follows.
    """
    split = None
    if isinstance(inputs, torch.Tensor):
        split = split_for(model, (inputs,), {}, lambda: call_model(model.base_model, inputs))
    if split is None:
        return lambda: call_model(model.base_model, inputs)
    with torch.no_grad(), explain_device_dtype_errors(model.base_model, inputs):
        boundary = split.prefix((inputs,), {})

    def run() -> Any:
        with explain_device_dtype_errors(model.base_model, inputs):
            return split.suffix(boundary)

    return run


def _finite_rows(
    delta: torch.Tensor, cond: Conditioning, losses: tuple[torch.Tensor | None, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) True where the delta, the losses and the conditioning of a sample are finite, and
    the sum of each delta's elements (B,).

    One pass: a NaN or an infinity makes the sum non-finite. A sum of finite elements that
    overflows (elements near 1e34) is told apart by amax/amin on those rows alone.
    """
    B = delta.shape[0]
    total = delta.reshape(B, -1).sum(1)
    finite = torch.isfinite(total)
    if not bool(finite.all()):
        flat = delta.reshape(B, -1)[~finite]  # amax/amin propagate NaN, and do not overflow
        finite[~finite] = torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1))
    for t in losses:
        if t is not None:
            finite &= torch.isfinite(t) if t.dim() else torch.isfinite(t).expand(B)
    for t in (cond.layer_input, cond.layer_output, cond.model_output):
        finite &= torch.isfinite(t).all(1)
    return finite, total


def _raw_input(records: list, kind: str, B: int) -> torch.Tensor:
    """The target layer's input of the base pass; a Linear's chunks joined along positions."""
    if len(records) == 1 or kind != "linear":
        return records[0][0].detach()
    return torch.cat([x.detach().reshape(B, -1, x.shape[-1]) for x, _ in records], 1)


def overfit_batch(
    model: OCDModel,
    inputs: Any,
    target: Any,
    loss_fn: LossFn,
    *,
    config: OCDConfig | None = None,
    check_loss: bool = True,
    adam_formula: str = ADAM_OUTER_FORMULA,
    workspace: dict | None = None,
    loss_after: bool = True,
) -> OverfitResult:
    """Overfit the target layer on each sample of one batch separately (vectorized).

    Returns the per-sample deltas, the conditioning captured in the first (delta = 0) pass,
    and the losses before and after. The base model is put in eval mode for the call.
    ``loss_fn`` gives per-sample losses (B,) or their sum; a scalar that is not their sum (a
    batch mean would make every sample's step depend on the batch size) is a
    :class:`~ocdwrap.errors.LossShapeError` naming the fix (``check_loss=False`` skips the check,
    a few loss evaluations on four samples; ``collect`` runs it on its first batch only).
    ``adam_formula``: how Adam's step on a Linear layer's outer-product gradient is evaluated
    (:data:`ADAM_OUTER_FORMULA`, or :data:`ADAM_OUTER_FORMULA_V1` to continue a collection made
    by 0.1.0: the same values up to rounding). ``workspace``: a dict the caller keeps across
    calls, in which the (B, out, in) buffers of a Linear target are reused instead of made anew
    per batch (page faults); the returned ``delta`` is then one of them, overwritten by the next
    call with the same workspace (``collect`` stores each batch's rows before the next).
    ``loss_after=False`` skips the pass after the last step that only measures the loss the
    deltas reach (``loss_after`` is then None; the deltas are the same): ``collect`` and every
    caller that keeps only the deltas pass it.

    Example:
        >>> res = overfit_batch(model, x, y, nn.CrossEntropyLoss(reduction="none"))
        >>> res.delta.shape      # (B, out, in)
    """
    cfg = config or model.config
    if adam_formula not in _ADAM_OUTER_FORMULAS:
        raise ConfigError(f"adam_formula={adam_formula!r}: use one of {_ADAM_OUTER_FORMULAS}.")
    layer = model.target_layer
    B = batch_size(inputs)
    # Linear: d loss / d output comes from a zero probe added to the layer's output, and the
    # weight gradient g xᵀ is built from it (for one input vector per sample, never formed: see
    # _adam_outer_update). Conv2d: autograd differentiates the stacked deltas directly.
    probed = layer.kind == "linear"
    shape, device = (B, *layer.weight.shape), layer.weight.device
    if probed and workspace is not None:  # no autograd on the deltas themselves: reusable
        delta = _buffer(workspace, "delta", shape, device).zero_()
    else:
        delta = torch.zeros(shape, dtype=torch.float32, device=device)
    delta.requires_grad_(not probed)
    optimizer = _PerSampleOptimizer(delta, cfg, adam_formula, workspace if probed else None)
    mask = attention_mask((inputs,), inputs if isinstance(inputs, dict) else {})
    after = None  # loss_after: the losses of one more pass after the last step, when asked for
    was_training = model.base_model.training
    model.base_model.eval()
    try:
        run = _pass_runner(model, inputs)
        with torch.enable_grad():
            for step in range(cfg.overfit_steps + int(loss_after)):
                spec = (
                    OutputProbe(FullDelta(delta) if step else None) if probed else FullDelta(delta)
                )
                # the spec stays set through backward: gradient checkpointing recomputes the forward
                with model.use_deltas(spec):
                    if step == 0:
                        with model._capture.session() as records:
                            pred = read_output(run())
                    else:
                        pred = read_output(run())
                    losses = per_sample_loss(loss_fn, pred, target, B)
                    if step == 0:
                        opts = conditioning_options(cfg)
                        cond = build_conditioning(records, pred, layer.kind, B, mask, **opts)
                        raw_input = _raw_input(records, layer.kind, B)
                        loss_before = losses.detach()
                        if check_loss and losses.dim() == 0:
                            check_loss_is_sum(loss_fn, pred.detach(), target, losses)
                    if step == cfg.overfit_steps:
                        after = losses.detach()
                        break
                    if probed and len(records) > 1:
                        # the layer ran in chunks: autograd sums every call's gradient into the
                        # stacked deltas (one extra pass, at step 0 only)
                        probed = False
                        delta.requires_grad_(True)
                        with model.use_deltas(FullDelta(delta)):
                            losses = per_sample_loss(loss_fn, read_output(run()), target, B)
                            (grad,) = torch.autograd.grad(losses.sum(), delta)
                    else:
                        (grad,) = torch.autograd.grad(losses.sum(), spec.probe if probed else delta)
                if probed:
                    with torch.no_grad():
                        grad = _linear_weight_gradient(grad, raw_input, B)
                optimizer.step(grad, step + 1)
    finally:
        model.base_model.train(was_training)
    delta = delta.detach()
    finite, delta_sum = _finite_rows(delta, cond, (loss_before, after))
    return OverfitResult(delta, cond, loss_before, after, finite, raw_input, delta_sum)


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
        with model.disable_adapter():
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
