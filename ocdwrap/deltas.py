"""Per-sample deltas: their types, and the math of their size and factors.

* :class:`FullDelta`: the whole matrix per sample; :class:`Rank1Delta`: u vᵀ per sample for a
  Linear layer on vector inputs (docs/how-ocd-works.md, "A structural fact: rank-one deltas");
  :class:`LowRankDelta`: sum_k s_k u_k v_kᵀ per sample, r factor pairs (Conv2d, token
  sequences; docs/how-ocd-works.md, "Deltas that are not rank one");
  :class:`OutputProbe`: what collection sets to read d loss / d layer output.
* :func:`delta_scale`: rho_s, the size each delta is divided by ("std" or "rms").
* :func:`rank1_right_factor`, :func:`rank1_factors`: v follows from the layer input (the input for
  SGD, its sign for Adam), u by least squares.
* :func:`top_singular_energy`: how much of each delta its top singular value holds.
* :func:`lowrank_factors`: the canonical top-r factors of each delta by a batched SVD, and the
  energy they keep; :func:`canonical_factors` puts any factorisation in that canonical form.

This module is the bottom of the package: it imports nothing from ocdwrap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch


class _SpecTensors:
    """What every delta spec can do with its tensors (each of them has the samples in dim 0)."""

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        """The same kind of spec with ``fn`` applied to each of its tensors."""
        return type(self)(*(fn(getattr(self, f.name)) for f in fields(self)))

    def index(self, part: slice | torch.Tensor) -> Any:
        """Samples ``part`` (a slice or an index tensor over dim 0).

        Example:
            >>> FullDelta(torch.zeros(4, 3, 2)).index(slice(1, 3)).batch
            2
        """
        return self.map(lambda t: t[part])

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Every tensor moved or cast like ``torch.Tensor.to(*args, **kwargs)``."""
        return self.map(lambda t: t.to(*args, **kwargs))


@dataclass
class FullDelta(_SpecTensors):
    """A full per-sample delta: (B, out, in) for Linear, (B, out, in, kh, kw) for Conv2d."""

    delta: torch.Tensor

    @property
    def batch(self) -> int:
        return self.delta.shape[0]

    def full(self, weight_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The per-sample weights changes, (B, *weight.shape) (every spec type has ``full``)."""
        d = self.delta
        return d if weight_shape is None else d.reshape(self.batch, *weight_shape)


@dataclass
class Rank1Delta(_SpecTensors):
    """A rank-one per-sample delta u vᵀ for a Linear layer: u (B, out), v (B, in)."""

    u: torch.Tensor
    v: torch.Tensor

    @property
    def batch(self) -> int:
        return self.u.shape[0]

    def full(self, weight_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The matrices, (B, out, in)."""
        mats = self.u.unsqueeze(2) * self.v.unsqueeze(1)
        return mats if weight_shape is None else mats.reshape(self.batch, *weight_shape)


@dataclass
class LowRankDelta(_SpecTensors):
    """A rank-r per-sample delta sum_k s_k u_k v_kᵀ: u (B, r, out), s (B, r), v (B, r, in').

    in' is the layer's input width: ``in`` for Linear, ``in·kh·kw`` for Conv2d (v_k is a
    flattened (in, kh, kw) kernel). The layer applies it without forming the matrices.

    Example:
        >>> spec = LowRankDelta(torch.randn(2, 3, 8), torch.rand(2, 3), torch.randn(2, 3, 5))
        >>> spec.full().shape, spec.rank
        (torch.Size([2, 8, 5]), 3)
    """

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor

    @property
    def batch(self) -> int:
        return self.u.shape[0]

    @property
    def rank(self) -> int:
        return self.s.shape[1]

    def full(self, weight_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The matrices (B, out, in'), or (B, *weight_shape) when given (Conv2d kernels)."""
        mats = torch.einsum("bro,br,bri->boi", self.u, self.s, self.v)  # (B, out, in')
        return mats if weight_shape is None else mats.reshape(self.batch, *weight_shape)


@dataclass
class OutputProbe:
    """Collection's spec: an optional full delta, plus a zero tensor added to the layer output.

    The layer creates ``probe`` (zeros shaped like its output, requiring grad) on the first
    forward and reuses it after (a forward recomputed under gradient checkpointing adds the same
    tensor), so ``autograd.grad(loss, probe)`` is d loss / d layer output, from which collection
    builds the weight gradient of a Linear layer without autograd forming it.
    """

    delta: FullDelta | None = None
    probe: torch.Tensor | None = None


DeltaSpec = FullDelta | Rank1Delta | LowRankDelta

# the stored keys of a low-rank collection's factors (docs: ocdwrap/store.py)
LOWRANK_KEYS = ("lowrank_u", "lowrank_s", "lowrank_v")


# how far above the returned energy s1² may lie, as a share of ‖Δ‖²_F, before an SVD settles it
ENERGY_TOL = 1e-6


def top_singular_energy(
    delta: torch.Tensor,
    *,
    iters: int = 2,
    tol: float = ENERGY_TOL,
    start: torch.Tensor | None = None,
    start_image: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fraction of each delta's energy in its top singular value, s1² / ‖Δ‖²_F, (B,).

    A zero delta gives 1. Power iteration on ΔᵀΔ (started from ``start`` (B, in), or else from
    Δ's largest row; ``start_image`` = Δ·``start`` (B, out), when the caller has it, saves the
    first product) gives a lower bound a = ‖Δv‖² of s1²; with c = ‖ΔᵀΔv − a v‖ and
    b = ‖Δ‖²_F − a, s1² is at most the top eigenvalue of [[a, c], [c, b]]. Samples where that
    bracket is wider than ``tol``·‖Δ‖²_F (deltas far from rank one) get ``torch.linalg.svdvals``;
    the near-rank-one deltas of a Linear layer (docs/how-ocd-works.md) need a few matrix-vector
    products each instead of an SVD. ``total``: ‖Δ‖²_F (B,), when the caller has it.
    """
    B = delta.shape[0]
    mats = delta.reshape(B, delta.shape[1], -1).float()  # (B, out, in)
    if total is None:
        flat = mats.reshape(B, -1)
        total = torch.linalg.vecdot(flat, flat)  # (vector_norm's float32 sum is less exact here)
    first_image = None  # (Δv)ᵀ of the normalised start, when the caller has Δ·start
    if start is None:
        rows = torch.linalg.vector_norm(mats, dim=2).argmax(1)  # (B,)
        v = mats[torch.arange(B, device=mats.device), rows].unsqueeze(1)  # (B, 1, in), row vectors
    else:
        v, first_image = _unit_start(start, start_image)
    for i in range(iters):
        image = first_image if i == 0 else None
        if image is None:  # row vectors throughout (see rank1_factors: the fast bmm form)
            image = torch.bmm(v, mats.transpose(1, 2))  # (Δv)ᵀ, (B, 1, out)
        v = torch.bmm(image, mats)  # vᵀΔᵀΔ
        v = v / v.norm(dim=2, keepdim=True).clamp_min(1e-30)
    frac, loose = _energy_bracket(mats, v, torch.bmm(v, mats.transpose(1, 2)), total, tol)
    if bool(loose.any()):
        s = torch.linalg.svdvals(mats[loose])
        frac[loose] = s[:, 0] ** 2 / (s**2).sum(1).clamp_min(1e-30)
    return frac


def _unit_start(
    start: torch.Tensor, start_image: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``start`` (B, in) normalised, as row vectors (B, 1, in), and Δ·start scaled alike."""
    norm = start.float().norm(dim=1, keepdim=True).clamp_min(1e-30)  # (B, 1)
    image = None if start_image is None else (start_image.float() / norm).unsqueeze(1)
    return (start.float() / norm).unsqueeze(1), image  # image: (B, 1, out)


def _energy_bracket(
    mats: torch.Tensor, v: torch.Tensor, w: torch.Tensor, total: torch.Tensor, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """a / ‖Δ‖²_F at the unit vector v (B, 1, in) with w = (Δv)ᵀ (B, 1, out), and where the
    bracket of :func:`top_singular_energy` is wider than ``tol`` (B,) bool. A zero delta gives 1."""
    B = mats.shape[0]
    a = w.square().sum((1, 2))
    c = (torch.bmm(w, mats) - a.view(B, 1, 1) * v).norm(dim=(1, 2))
    b = (total - a).clamp_min(0)
    upper = (a + b) / 2 + torch.sqrt(((a - b) / 2) ** 2 + c**2)
    frac = torch.where(total > 0, a / total.clamp_min(1e-30), torch.ones_like(a))
    return frac, (upper - a > tol * total) & (total > 0)


def delta_scale(flat: torch.Tensor, normalization: str) -> torch.Tensor:
    """rho_s of each row of ``flat`` (B, numel): per-element std ("std") or root mean square ("rms")."""
    if normalization == "rms":
        return flat.square().mean(1).sqrt().clamp_min(1e-20)
    # per-element std in two passes: ~15x faster on CPU here than Tensor.std over dim 1; the
    # centred copy is squared in place (one delta-sized temporary, not two: each fresh one costs
    # page faults)
    return (flat - flat.mean(1, keepdim=True)).square_().mean(1).sqrt().clamp_min(1e-20)


def scale_from_sums(
    flat: torch.Tensor, normalization: str, row_sum: torch.Tensor, row_sumsq: torch.Tensor
) -> torch.Tensor:
    """:func:`delta_scale` of each row of ``flat`` (B, numel) from its sum and sum of squares
    (B,), which the caller has already (one pass each, shared with the finite check and the
    energy): no pass over ``flat`` and no temporary, where :func:`delta_scale` takes three.

    The variance E[x²] - E[x]² is taken in float64 from the float32 sums; rows whose mean
    carries more than 99 % of E[x²] (the difference would lose digits) or whose sums are not
    finite are computed by :func:`delta_scale`. It rounds differently from :func:`delta_scale`
    (about 1e-6 relative), so a collection records which one made its rows (``ROWS_FORMULA``).
    """
    n = flat.shape[1]
    mean_sq = row_sumsq.double() / n
    if normalization == "rms":
        out = mean_sq.sqrt()
        redo = ~torch.isfinite(out)
    else:
        mean = row_sum.double() / n
        var = mean_sq - mean * mean
        out = var.clamp_min(0).sqrt()
        redo = ~(torch.isfinite(var) & (var > 0.01 * mean_sq)) & (mean_sq > 0)
    out = out.float().clamp_min(1e-20)
    if bool(redo.any()):
        out[redo] = delta_scale(flat[redo], normalization)
    return out


def rank1_right_factor(layer_input: torch.Tensor, optimizer: str) -> torch.Tensor:
    """The right factor v of a rank-one delta: the input for SGD, its sign for Adam (docs/how-ocd-works.md)."""
    return layer_input.sign() if optimizer == "adam" else layer_input


def rank1_factors(
    delta: torch.Tensor, layer_input: torch.Tensor, optimizer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares u for delta ≈ u vᵀ given the right factor v; returns (u (B, out), v (B, in))."""
    v = rank1_right_factor(layer_input.float(), optimizer)
    # (B, out): Δ v, as vᵀ Δᵀ: on CPU a row vector times a transposed matrix runs several
    # times faster than bmm of the matrix with a column (measured 0.5 vs 3.2 ms at 256 x 84 x 120)
    u = torch.bmm(v.unsqueeze(1), delta.float().transpose(1, 2)).squeeze(1)
    return u / (v * v).sum(1, keepdim=True).clamp_min(1e-30), v


def rank1_energy(
    delta: torch.Tensor,
    v: torch.Tensor,
    image: torch.Tensor | None = None,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`top_singular_energy` of deltas whose top right singular vector is close to ``v``.

    The right factor of a Linear layer's delta is known from its input (:func:`rank1_right_factor`),
    so the power iteration can start there: one iteration instead of two from the largest row,
    with the same bracket and the same SVD for the deltas it does not settle. ``image`` = Δv
    (B, out), when known (:func:`rank1_factors` computes it), is not computed again.

    With ``image`` and ``total`` (‖Δ‖²_F, (B,)) the bracket is first taken at ``v`` itself, one
    product per delta; the deltas it settles within the tolerance keep that value, the rest take
    the iteration. The two agree within the tolerance but not bit for bit, so a collection
    records which one made its rows (``ROWS_FORMULA``).
    """
    if image is None or total is None:
        return top_singular_energy(delta, iters=1, start=v, start_image=image)
    mats = delta.reshape(delta.shape[0], delta.shape[1], -1).float()
    frac, loose = _energy_bracket(mats, *_unit_start(v, image), total, ENERGY_TOL)
    if bool(loose.any()):
        frac[loose] = top_singular_energy(
            delta[loose], iters=1, start=v[loose], start_image=image[loose], total=total[loose]
        )
    return frac


def canonical_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The canonical form of factors u (B, r, out), s (B, r), v (B, r, in').

    The same matrices sum_k s_k u_k v_kᵀ have many factorisations (any order of the terms, any
    sign of each pair); the generator should learn one. Canonical: every s_k >= 0 (a negative
    one moves its sign into v_k), s descending, and the largest-magnitude entry of each u_k
    positive (u_k and v_k flipped together). Ties (equal s, or two entries of u_k of equal
    magnitude) keep the first one.

    Example:
        >>> u, s, v = canonical_factors(u, s, v)
    """
    neg = s < 0  # (B, r)
    v = torch.where(neg.unsqueeze(2), -v, v)
    s = s.abs()
    order = torch.sort(s, dim=1, descending=True, stable=True).indices  # (B, r)
    s = torch.gather(s, 1, order)
    u = torch.gather(u, 1, order.unsqueeze(2).expand_as(u))
    v = torch.gather(v, 1, order.unsqueeze(2).expand_as(v))
    peak = torch.gather(u, 2, u.abs().argmax(2, keepdim=True))  # (B, r, 1)
    sign = torch.where(peak < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, s, v * sign


def lowrank_factors(
    delta: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` canonical factors of each delta by a batched SVD, and the energy they keep.

    ``delta`` is (B, out, in) or (B, out, in, kh, kw) (taken as (B, out, in·kh·kw)). Returns
    u (B, r, out), s (B, r), v (B, r, in') with sum_k s_k u_k v_kᵀ the best rank-r
    approximation (Eckart-Young) in :func:`canonical_factors` form, and
    energy (B,) = sum of the top r s_k² / ‖Δ‖²_F (1 for a zero delta).

    Example:
        >>> u, s, v, energy = lowrank_factors(torch.randn(4, 16, 6, 5, 5), rank=3)
        >>> u.shape, s.shape, v.shape
        (torch.Size([4, 3, 16]), torch.Size([4, 3]), torch.Size([4, 3, 150]))
    """
    B = delta.shape[0]
    mats = delta.reshape(B, delta.shape[1], -1).float()  # (B, out, in')
    U, S, Vh = torch.linalg.svd(mats, full_matrices=False)  # (B, out, m), (B, m), (B, m, in')
    u = U[:, :, :rank].transpose(1, 2)  # (B, r, out)
    s, v = S[:, :rank], Vh[:, :rank]  # (B, r), (B, r, in')
    total = S.square().sum(1)  # (B,)
    energy = s.square().sum(1) / total.clamp_min(1e-30)
    energy = torch.where(total > 0, energy, torch.ones_like(energy))
    u, s, v = canonical_factors(u, s, v)
    return u.contiguous(), s.contiguous(), v.contiguous(), energy
