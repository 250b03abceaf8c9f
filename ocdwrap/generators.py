"""The generator interface: what learns, from a collection, to give each input its own delta.

A generator is any object with two methods (:class:`Generator`, a ``typing.Protocol``; no base
class to inherit):

* ``fit(model, store, args)``: learn from a collection (``store``, a :class:`DeltaStore` made
  by ``ocdwrap.collect`` with ``model``) with the fit settings ``args`` (a :class:`FitArgs`);
* ``generate(model, cond, inputs, rng)``: the per-sample deltas (a :class:`FullDelta`,
  :class:`Rank1Delta` or :class:`LowRankDelta`, one delta per sample, in the layer's own units:
  what ``model.use_deltas(spec)`` applies) for a batch, from its conditioning ``cond`` (I(x),
  as ``model.conditioning(x)`` gives it), its ``inputs`` (the batch as the base model takes it)
  and a ``torch.Generator`` ``rng`` for any randomness (None: torch's global one).

The library's own generators implement it: :class:`DiffusionGenerator` (the paper's) and
:class:`RegressionGenerator` (an MLP trained with MSE on the same normalised deltas), both
:class:`HypernetworkGenerator`\\ s, :class:`NearestNeighbour` (the stored delta of the closest
training sample) and :class:`GlobalScale` (the diffusion generator without its scale model).
``ocdwrap.compare(..., generators={"name": obj})`` scores any of them, or yours, as a row.
:func:`stored_deltas` reads a collection's deltas, in the layer's units, for generators of your
own.

Example:
    >>> class MeanDelta:  # every input gets the training set's mean delta
    ...     def fit(self, model, store, args):
    ...         self.mean = ocdwrap.generators.stored_deltas(store)[1].full().mean(0)
    ...     def generate(self, model, cond, inputs, rng):
    ...         return ocdwrap.FullDelta(self.mean.expand(len(cond.layer_input), *self.mean.shape))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch

from .batches import batch_size, split_batch, to_device
from .capture import Conditioning
from .config import FitArgs, OCDConfig
from .deltas import LOWRANK_KEYS, DeltaSpec, FullDelta, LowRankDelta, Rank1Delta
from .errors import ConfigError, NotFittedError
from .fit import FitReport, fit
from .model import OCDModel
from .store import DeltaStore

__all__ = [
    "DiffusionGenerator",
    "Generator",
    "GlobalScale",
    "HypernetworkGenerator",
    "NearestNeighbour",
    "RegressionGenerator",
    "conditioning_statistics",
    "stored_deltas",
]


@runtime_checkable
class Generator(Protocol):
    """Learns from a collection to give each input a delta of the target layer."""

    def fit(self, model: OCDModel, store: DeltaStore, args: FitArgs) -> None:
        """Learn from ``store`` (a collection made with ``model``), with fit settings ``args``."""

    def generate(
        self, model: OCDModel, cond: Conditioning, inputs: Any, rng: torch.Generator | None
    ) -> DeltaSpec:
        """One delta per sample of the batch (``cond`` its conditioning, ``inputs`` the batch)."""


@contextmanager
def _borrowed(model: OCDModel, config: OCDConfig, hypernet: Any) -> Iterator[OCDModel]:
    """``model`` with another config and hypernetwork for the block (its own restored after):
    one wrapped base serves several generators without a second wrap or a copy of the base."""
    saved = (model.config, model.hypernet, model.fit_report, model.is_trainable)
    model.config, model.hypernet, model.is_trainable = config, hypernet, False
    try:
        yield model
    finally:
        model.config, model.hypernet, model.fit_report, model.is_trainable = saved


class HypernetworkGenerator:
    """An OCD hypernetwork (generator and scale model) fitted by :func:`ocdwrap.fit`.

    ``kind``: ``"diffusion"`` or ``"regression"`` (``OCDConfig.generator``); None takes the
    model's own. A generator of the model's own kind is fitted *on the model*: afterwards the
    model predicts with it (and ``save_pretrained`` saves it), as after ``ocdwrap.fit``. Another
    kind is fitted and used with the model's config changed in that one field, for the duration
    of each call only; the model's own hypernetwork stays as it was. Not thread-safe.
    ``report`` is the :class:`FitReport` once fitted.
    """

    def __init__(
        self,
        kind: str | None = None,
        *,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> None:
        if kind not in (None, "diffusion", "regression"):
            raise ConfigError(f"kind={kind!r}; choose 'diffusion', 'regression' or None.")
        self.kind, self.device, self.progress = kind, device, progress
        self.config: OCDConfig | None = None
        self.hypernet: Any = None
        self.report: FitReport | None = None

    def _own(self, model: OCDModel) -> bool:
        return self.kind is None or self.kind == model.config.generator

    def fit(self, model: OCDModel, store: DeltaStore, args: FitArgs) -> None:
        kw = {"device": self.device, "progress": self.progress}
        if self._own(model):
            self.report = fit(model, store, args, **kw)
            self.config, self.hypernet = model.config, model.hypernet
            return
        config = model.config.replace(generator=self.kind)
        with _borrowed(model, config, None):
            self.report = fit(model, store, args, **kw)
            self.config, self.hypernet = config, model.hypernet

    def generate(
        self, model: OCDModel, cond: Conditioning, inputs: Any, rng: torch.Generator | None
    ) -> DeltaSpec:
        if self.hypernet is None:
            raise NotFittedError(f"This {type(self).__name__} is not fitted yet: call fit first.")
        if self.hypernet is model.hypernet:
            return model.generate(cond, rng=rng)
        with _borrowed(model, self.config, self.hypernet):
            return model.generate(cond, rng=rng)


class DiffusionGenerator(HypernetworkGenerator):
    """The paper's generator: a conditional diffusion model of the normalised delta."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("diffusion", **kw)


class RegressionGenerator(HypernetworkGenerator):
    """An MLP regressor of the normalised delta, trained with MSE: the no-diffusion control."""

    def __init__(self, **kw: Any) -> None:
        super().__init__("regression", **kw)


class GlobalScale:
    """The model's own fitted diffusion generator with the training set's mean scale rho for
    every input instead of the scale model's rho(I(x)): the paper's "no scaling" ablation.

    For ``compare(..., generators={"global_scale": GlobalScale()})``: ``compare`` fits the
    model's own generator before any caller's, so there is nothing of its own to fit (its build
    time is the collection's); on an unfitted model ``fit`` fits the model's generator.
    """

    def fit(self, model: OCDModel, store: DeltaStore, args: FitArgs) -> None:
        if model.hypernet is None:
            fit(model, store, args)

    def generate(
        self, model: OCDModel, cond: Conditioning, inputs: Any, rng: torch.Generator | None
    ) -> DeltaSpec:
        if model.hypernet is None:
            raise NotFittedError("GlobalScale samples the model's own generator: fit it first.")
        with model.sampling(scale="global"):
            return model.generate(cond, rng=rng)


def _delta_keys(store: DeltaStore) -> tuple[str, list[str]]:
    stored = set(store.keys)
    if {"u", "v"} <= stored:
        return "rank1", ["u", "v"]
    if set(LOWRANK_KEYS) <= stored:
        return "lowrank", list(LOWRANK_KEYS)
    if "delta" in stored:
        return "full", ["delta"]
    raise ConfigError(
        f"The collection in {store.directory} stores {sorted(stored)}, none of the delta forms "
        "(u/v, lowrank_u/s/v, delta); collect it again."
    )


def stored_deltas(store: DeltaStore) -> tuple[torch.Tensor, DeltaSpec]:
    """The positions (N,) of a collection's samples in the training data, and their deltas in
    the layer's units (rho times the stored normalised delta), in the form the collection
    keeps them: :class:`Rank1Delta`, :class:`LowRankDelta` or :class:`FullDelta`.

    Example:
        >>> index, spec = stored_deltas(ocdwrap.DeltaStore("deltas/"))
        >>> spec.full().mean(0)       # the training set's mean delta, (out, in)
    """
    form, keys = _delta_keys(store)
    data = store.load(["index", "rho", *keys])
    rho = data["rho"].float()
    if form == "rank1":
        spec: DeltaSpec = Rank1Delta(rho.unsqueeze(1) * data["u"].float(), data["v"].float())
    elif form == "lowrank":
        u, s, v = (data[k].float() for k in LOWRANK_KEYS)
        spec = LowRankDelta(u, rho.unsqueeze(1) * s, v)
    else:
        d = data["delta"].float() * rho.view(-1, 1, 1)
        shape = tuple(store.weight_shape)
        spec = FullDelta(d.reshape(d.shape[0], *shape))
    return data["index"].long(), spec


def conditioning_statistics(store: DeltaStore) -> Callable[[Conditioning], torch.Tensor]:
    """Standardises a conditioning as the generators do: each part (layer input, layer output,
    model output) by its mean and standard deviation over the collection (the hypernetwork's
    ``set_statistics``); returns ``cond -> (B, d)`` features, the parts concatenated."""
    data = store.load(["cond_in", "cond_act", "cond_out"])
    stats = []
    for t in (data["cond_in"], data["cond_act"], data["cond_out"]):
        t = t.float()
        std = t.std(0, unbiased=False).clamp_min(1e-6) if t.shape[0] > 1 else torch.ones_like(t[0])
        stats.append((t.mean(0), std))

    def standardise(cond: Conditioning) -> torch.Tensor:
        parts = (cond.layer_input, cond.layer_output, cond.model_output)
        return torch.cat(
            [(p.float().cpu() - m) / s for p, (m, s) in zip(parts, stats)], dim=1
        ).reshape(parts[0].shape[0], -1)

    return standardise


Features = Callable[[Any], torch.Tensor]


def _feature_rows(features: Features, data: Iterable, device: torch.device) -> torch.Tensor:
    """``features(inputs)`` of every sample of ``data``, in order, as (N, d) rows."""
    rows = []
    for batch in data:
        inputs, _ = split_batch(batch)
        inputs = to_device(inputs, device)
        if batch_size(inputs) == 0:
            continue
        with torch.no_grad():
            rows.append(_as_rows(features(inputs), batch_size(inputs)))
    return torch.cat(rows)


def _as_rows(t: Any, n: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.shape[:1] != (n,):
        raise ConfigError(
            f"features(inputs) must return a tensor with one row per sample ({n}), got "
            f"{type(t).__name__} {tuple(getattr(t, 'shape', ()))}."
        )
    return t.detach().float().reshape(n, -1).cpu()


class NearestNeighbour:
    """Each input gets the stored delta of the training sample nearest to it (L2): the paper's
    nearest-neighbour ablation.

    Distance: in conditioning space, I(x) standardised as the generators standardise it
    (:func:`conditioning_statistics`); or, with ``features=`` (a callable ``inputs -> (B, d)``
    tensor, e.g. pixels or a domain's own embedding), in that space, which needs the training
    inputs again: ``train_data``, in the order the collection was made in.
    """

    def __init__(self, features: Features | None = None, train_data: Iterable | None = None):
        if features is not None and train_data is None:
            raise ConfigError(
                "NearestNeighbour(features=...) needs train_data= too: the training samples' "
                "features are computed from their inputs, in the collection's order."
            )
        self.features, self.train_data = features, train_data
        self.spec: DeltaSpec | None = None

    def fit(self, model: OCDModel, store: DeltaStore, args: FitArgs | None = None) -> None:
        index, self.spec = stored_deltas(store)
        if self.features is None:
            self._standardise = conditioning_statistics(store)
            data = store.load(["cond_in", "cond_act", "cond_out"])
            self.train = self._standardise(Conditioning.from_dict(data))
        else:
            rows = _feature_rows(self.features, self.train_data, model.device)
            if int(index.max()) >= rows.shape[0]:
                raise ConfigError(
                    f"train_data gave {rows.shape[0]} samples but the collection holds sample "
                    f"{int(index.max())}: pass the data the collection was made from."
                )
            self.train = rows[index]

    def nearest(self, cond: Conditioning, inputs: Any) -> torch.Tensor:
        """The row (in the collection) of each sample's nearest training sample."""
        if self.spec is None:
            raise NotFittedError("This NearestNeighbour is not fitted yet: call fit first.")
        if self.features is None:
            query = self._standardise(cond)
        else:
            with torch.no_grad():
                query = _as_rows(self.features(inputs), cond.layer_input.shape[0])
        return torch.cdist(query, self.train).argmin(1)

    def generate(
        self, model: OCDModel, cond: Conditioning, inputs: Any, rng: torch.Generator | None
    ) -> DeltaSpec:
        return self.spec.index(self.nearest(cond, inputs)).to(model.device)
