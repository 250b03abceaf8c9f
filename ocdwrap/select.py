"""Layer selection: which layer should OCD overfit?

Lutati & Wolf, "OCD: Learning to Overfit with Conditional Diffusion Models" (ICLR 2023):
perturb one candidate layer at a time and measure how much each calibration sample's loss moves.
The score of layer L is

    score(L) = sum over calibration samples s of  H( loss_s(draw 1), ..., loss_s(draw D) ),

the entropy H of sample s's loss across D random perturbations of L's weight (every other
parameter at its base value). The entropy is a Gaussian kernel density estimate, see
:func:`kde_entropy`. The layer with the highest score, the one whose weight the loss is most
sensitive to, is chosen.

Two perturbations (``perturbation=``):

* ``"gaussian"`` (the paper's text): W + noise_scale * std(W) * N(0, 1);
* ``"reinit"`` (a variant; the authors' public repository holds no layer-selection code, so
  neither perturbation is theirs): W replaced by a fresh draw of the layer's
  ``reset_parameters()`` initialisation (kaiming-uniform, bound 1/sqrt(fan_in), for the stock
  nn.Linear / nn.Conv2d).

Only the weight is perturbed; the bias keeps its base value. Nothing is back-propagated and the
base model is never modified: perturbed weights are passed with ``torch.func.functional_call``.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import math
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .batches import (
    Inputs,
    batch_size,
    call_model,
    index_batch,
    read_output,
    sample_losses,
    split_batch,
    to_device,
)
from .errors import ConfigError, EmptyDataError, LayerNotFoundError
from .layer_scores import LayerScore, LayerScores

__all__ = ["LayerScore", "LayerScores", "kde_entropy", "select_layer", "list_candidates"]

PERTURBATIONS = ("gaussian", "reinit")
SELECTABLE = (nn.Linear, nn.Conv2d)
SAMPLE_FORWARD_BUDGET = 1024  # draws x samples per vmapped call when chunk_size is None


# --- the entropy estimate ----------------------------------------------------------------------


def kde_entropy(values: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of ``values`` (..., n) by a 1-D Gaussian kernel density estimate.

    The resubstitution estimator H = -mean_i log p_hat(v_i), with
    p_hat(v) = 1/(n h) * sum_j phi((v - v_j) / h) and phi the standard normal density.
    Bandwidth by Scott's rule, h = 1.06 * std * n^(-1/5) (std with Bessel's correction), floored
    at 1e-6 * (1 + |mean|), about float32 resolution of the values: a constant row gets the
    finite, very low entropy log(h_floor * sqrt(2 pi)) (about -12.9 for values near 0).
    Computed in float64.

    Example:
        >>> h = kde_entropy(torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)))
        >>> bool(((h - 1.419).abs() < 0.1).all())  # 0.5 * log(2 pi e) for N(0, 1)
        True
    """
    v = values.detach().to(torch.float64)
    n = v.shape[-1]
    std = v.std(dim=-1, keepdim=True) if n > 1 else torch.zeros_like(v[..., :1])
    floor = 1e-6 * (1.0 + v.mean(dim=-1, keepdim=True).abs())
    h = torch.maximum(1.06 * std * n ** (-0.2), floor)  # (..., 1)
    z = (v.unsqueeze(-1) - v.unsqueeze(-2)) / h.unsqueeze(-1)  # (..., n, n)
    log_p = torch.logsumexp(-0.5 * z**2, dim=-1) - torch.log(n * h * math.sqrt(2 * math.pi))
    return -log_p.mean(dim=-1)


# --- results -----------------------------------------------------------------------------------


def _as_patterns(p: str | Sequence[str] | None) -> list[str] | None:
    return None if p is None else [p] if isinstance(p, str) else list(p)


def _matches(name: str, patterns: list[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def list_candidates(
    base: nn.Module,
    *,
    candidates: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_params: int = 0,
    max_params: int | None = None,
) -> list[str]:
    """Names of the nn.Linear / nn.Conv2d modules of ``base`` that pass the filters, model order.

    ``candidates`` and ``exclude`` are fnmatch glob patterns or exact module names; the size
    limits apply to the number of elements of the weight.

    Example:
        >>> list_candidates(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), exclude="2")
        ['0']
    """
    keep, exclude_p = _as_patterns(candidates), _as_patterns(exclude) or []
    names = []
    for name, m in base.named_modules():
        if not isinstance(m, SELECTABLE) or not name:
            continue
        n = m.weight.numel()
        if keep is not None and not _matches(name, keep):
            continue
        if (
            _matches(name, exclude_p)
            or n < min_params
            or (max_params is not None and n > max_params)
        ):
            continue
        names.append(name)
    if not names:
        all_layers = [
            f"{n} ({type(m).__name__}, {'x'.join(map(str, m.weight.shape))})"
            for n, m in base.named_modules()
            if isinstance(m, SELECTABLE) and n
        ]
        listing = ", ".join(all_layers) if all_layers else "none: the model has no Linear or Conv2d"
        raise LayerNotFoundError(
            f"No candidate layer is left after the filters candidates={candidates!r}, "
            f"exclude={exclude!r}, min_params={min_params}, max_params={max_params}. "
            f"The model's Linear/Conv2d layers are: {listing}."
        )
    return names


# --- perturbations -----------------------------------------------------------------------------


def _has_stock_reset(layer: nn.Module) -> bool:
    stock = (
        nn.Linear.reset_parameters if isinstance(layer, nn.Linear) else nn.Conv2d.reset_parameters
    )
    return type(layer).reset_parameters is stock


def _draw_weights(
    layer: nn.Module, k: int, perturbation: str, noise_scale: float, gen: torch.Generator
) -> torch.Tensor:
    """``k`` perturbed copies of ``layer.weight``, shape (k, *weight.shape), on its device.

    Draws are made one at a time from ``gen`` (on the CPU), so they do not depend on how the
    draws are chunked nor on the device.
    """
    w = layer.weight.detach()
    if perturbation == "gaussian":
        noise = torch.stack([torch.randn(w.shape, generator=gen) for _ in range(k)])
        return w + noise_scale * w.float().std().to(w.dtype) * noise.to(w.device, w.dtype)
    if _has_stock_reset(layer):
        # nn.Linear / nn.Conv2d reset_parameters: kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), ..)
        bound = 1.0 / math.sqrt(w[0].numel()) if w[0].numel() > 0 else 0.0
        u = torch.stack([torch.rand(w.shape, generator=gen) * 2 - 1 for _ in range(k)])
        return (u * bound).to(w.device, w.dtype)
    # A subclass with its own reset_parameters: call it on a copy, with the global RNG forked.
    out = []
    for _ in range(k):
        fresh = copy.deepcopy(layer)
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
            fresh.reset_parameters()
        out.append(fresh.weight.detach())
    return torch.stack(out)


# --- evaluation --------------------------------------------------------------------------------


class _Call(nn.Module):
    """``base`` called the ocdwrap way, returning the prediction tensor (for functional_call)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return read_output(call_model(self.base, inputs))


def _draw_preds(call: _Call, pname: str, weights: torch.Tensor, inputs: Inputs, vmap: bool) -> Any:
    """Predictions (k, B, ...) of one batch under each of the k weights (k, *weight.shape)."""
    fcall = torch.func.functional_call
    if vmap:
        with warnings.catch_warnings():  # ops without a batching rule still run, just slower
            warnings.filterwarnings(
                "ignore", message=".*have not yet implemented the batching rule"
            )
            return torch.func.vmap(lambda w: fcall(call, {pname: w}, (inputs,)))(weights)
    return torch.stack([fcall(call, {pname: w}, (inputs,)) for w in weights])


def _layer_losses(
    call: _Call,
    pname: str,
    draw: Callable[[int], torch.Tensor],
    batches: list[tuple[Any, Any, int]],
    loss_fn: Callable,
    draws: int,
    chunk: int,
    vectorize: bool,
) -> tuple[torch.Tensor, str | None]:
    """Losses (samples, draws) of one layer, and the vmap error if it fell back to the loop."""
    error = None
    chunks = []  # (k, samples) each
    for lo in range(0, draws, chunk):
        w = draw(min(chunk, draws - lo))  # (k, *weight.shape)
        per_batch = []
        for inputs, target, n in batches:
            preds = None
            if vectorize and error is None:
                try:
                    preds = _draw_preds(call, pname, w, inputs, vmap=True)
                except Exception as e:  # any vmap failure: one draw per call instead
                    error = f"{type(e).__name__}: {str(e)[:200]}"
            if preds is None:
                preds = _draw_preds(call, pname, w, inputs, vmap=False)
            per_batch.append(torch.stack([sample_losses(loss_fn, p, target, n) for p in preds]))
        chunks.append(torch.cat(per_batch, dim=1))
    return torch.cat(chunks).T, error


def _calibration(
    data: Iterable, max_samples: int, device: torch.device
) -> list[tuple[Any, Any, int]]:
    batches, total = [], 0
    for batch in data:
        inputs, target = split_batch(batch)
        n = batch_size(inputs)
        take = min(n, max_samples - total)
        if take <= 0:
            continue
        if take < n:
            inputs, target = (
                index_batch(inputs, slice(0, take)),
                index_batch(target, slice(0, take)),
            )
        batches.append((to_device(inputs, device), to_device(target, device), take))
        total += take
        if total >= max_samples:
            break
    if total == 0:
        raise EmptyDataError(
            "select_layer got no calibration samples: the data iterable was empty (or yielded only "
            "empty batches). Pass a DataLoader (or list) of (inputs, target) batches, e.g. a few "
            "hundred training samples."
        )
    return batches


def _seed_for(seed: int, name: str) -> int:
    # Each layer gets its own stream, so its score does not depend on which others are candidates.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


# --- the selector ------------------------------------------------------------------------------


def _check_settings(perturbation: str, draws: int, max_samples: int) -> None:
    if perturbation not in PERTURBATIONS:
        raise ConfigError(
            f"perturbation={perturbation!r} is not valid; choose one of {list(PERTURBATIONS)}."
        )
    if draws < 2:
        raise ConfigError(f"draws must be >= 2 to estimate an entropy, got {draws}.")
    if max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}.")


def select_layer(
    base: nn.Module,
    data: Iterable,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    candidates: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_params: int = 0,
    max_params: int | None = None,
    perturbation: str = "gaussian",
    draws: int = 32,
    noise_scale: float = 1.0,
    max_samples: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    vectorize: bool = True,
    chunk_size: int | None = None,
) -> LayerScores:
    """Score every nn.Linear / nn.Conv2d of ``base`` by the paper's loss-entropy criterion.

    score(L) = sum over the first ``max_samples`` calibration samples of the entropy (Gaussian
    KDE, Scott's bandwidth, see :func:`kde_entropy`) of that sample's loss across ``draws``
    perturbations of L's weight. Higher is better; ``result.best`` is the layer to overfit.

    Args:
        base: the trained model. It is evaluated in eval mode under ``torch.no_grad`` and left
            exactly as it was (weights, training flags, requires_grad).
        data: batches in ocdwrap's conventions (``(inputs, target)`` or HF dicts with "labels").
        loss_fn: ``loss_fn(prediction, target)`` returning per-sample losses (B,) or their sum.
        candidates, exclude: fnmatch glob patterns or exact module names (a str or a list).
        min_params, max_params: limits on the number of elements of a candidate's weight.
        perturbation: "gaussian" (W + noise_scale * std(W) * N(0, 1), the paper) or "reinit"
            (a fresh ``reset_parameters()`` draw, a variant).
        draws: perturbation draws per layer (the same draws for every calibration sample).
        seed: seeds a torch.Generator per layer (from ``seed`` and the layer's name), so a
            layer's score does not depend on which other layers are candidates.
        device: where to evaluate; None: the model's device. If another device is named, a copy
            of the model is moved there (the base model itself is not moved).
        progress: a tqdm bar over the candidates.
        vectorize: evaluate ``chunk_size`` draws per forward call with ``torch.func.vmap`` over
            the stacked weights (``functional_call``), the default. Layers vmap cannot handle
            fall back, per layer, to one ``functional_call`` per draw, and one warning lists
            them: data-dependent Python control flow or ``.item()`` (every layer), random ops,
            or an in-place op that writes a perturbed tensor into an unperturbed one (e.g.
            ResNet's ``out += identity`` when the ``downsample`` conv is the candidate).
            ``vectorize=False`` always loops. Both paths give the same scores up to float
            rounding; vmap is faster, mostly because layers before the candidate run once.
        chunk_size: draws per vmapped call; None: about 1024 sample-forwards per call.

    Raises:
        LayerNotFoundError: no layer passes the filters (the message lists all layers).
        EmptyDataError: ``data`` yields no samples.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
        >>> loss = nn.CrossEntropyLoss(reduction="none")
        >>> scores = select_layer(model, data, loss, draws=8, progress=False)
        >>> scores.best in ("0", "2"), len(scores.ranking)
        (True, 2)
    """
    _check_settings(perturbation, draws, max_samples)
    names = list_candidates(
        base, candidates=candidates, exclude=exclude, min_params=min_params, max_params=max_params
    )
    start = time.perf_counter()
    model_device = next((p.device for p in base.parameters()), torch.device("cpu"))
    device = torch.device(device) if device is not None else model_device
    same = device.type == model_device.type and device.index in (None, model_device.index)
    model = base if same else copy.deepcopy(base).to(device)
    batches = _calibration(data, max_samples, device)
    samples = sum(n for _, _, n in batches)
    chunk = chunk_size or max(1, min(draws, SAMPLE_FORWARD_BUDGET // max(n for *_, n in batches)))

    call = _Call(model)
    modules = dict(model.named_modules())
    training = {m: m.training for m in model.modules()}
    results, failures = [], {}
    try:
        model.eval()
        with torch.no_grad():
            for name in tqdm(names, desc="layer selection", disable=not progress):
                layer = modules[name]
                gen = torch.Generator().manual_seed(_seed_for(seed, name))
                draw = functools.partial(_draw_weights, layer, perturbation=perturbation,
                                         noise_scale=noise_scale, gen=gen)  # fmt: skip
                loss, error = _layer_losses(
                    call, f"base.{name}.weight", draw, batches, loss_fn, draws, chunk, vectorize
                )  # (samples, draws)
                if error is not None:
                    failures[name] = error
                results.append(
                    LayerScore(
                        name=name,
                        score=float(kde_entropy(loss).sum()),
                        weight_shape=tuple(layer.weight.shape),
                        num_params=layer.weight.numel(),
                        loss_std=float(loss.double().std(dim=1).mean()),
                        vectorized=vectorize and error is None,
                        released_score=float(kde_entropy(loss.T).max()),
                    )
                )
    finally:
        for m, flag in training.items():
            m.training = flag
    if failures:
        first, reason = next(iter(failures.items()))
        warnings.warn(
            f"select_layer: torch.func.vmap could not evaluate {len(failures)} of {len(names)} "
            f"layers ({', '.join(failures)}); they were scored one draw per forward call (same "
            f"scores, slower). First error, on {first!r}: {reason}",
            stacklevel=2,
        )
    return LayerScores(
        layers=results,
        perturbation=perturbation,
        draws=draws,
        samples=samples,
        seed=seed,
        seconds=time.perf_counter() - start,
        noise_scale=noise_scale,
    )
