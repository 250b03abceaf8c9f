"""``compare()``: OCD and every control of the verdict on one model, in one resumable call."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..batches import map_tensors, split_batch
from ..collect import collect
from ..config import FitArgs, SamplingConfig
from ..ensemble import PROB_FLOOR
from ..errors import ConfigError, NotWrappedError, OCDError, RowFailedError
from ..evaluation import LabelledSplit, read_labelled
from ..generators import Generator, HypernetworkGenerator, NearestNeighbour, RegressionGenerator
from ..headroom import score_label_rows
from ..io import tensor_fingerprint
from ..model import OCDModel
from ..probe import probe_step
from ..store import DeltaStore
from . import rows as R
from .report import USES_EVAL_LABELS, Comparison, Metric, Row, paired_share, verdict
from .saved import COMPARISON_NAME, SavedComparison, collection_seconds, held_collection

__all__ = ["ROWS", "compare"]

logger = logging.getLogger("ocdwrap")

ROWS = (
    "base",
    "overfit",
    "ocd",
    "ocd_k",
    "regression",
    "nearest",
    "own_label",
    "probe",
    "compute_matched",
)
NEEDS_COLLECTION = ("ocd", "ocd_k", "regression", "nearest", "compute_matched")
DESCRIPTIONS = {
    "base": "the base model",
    "overfit": "each eval sample's layer overfitted alone towards its true label: the bound "
    "(uses the eval labels)",
    "ocd": "the configured generator ({generator}), one draw",
    "ocd_k": "the configured generator ({generator}), {k} draws averaged",
    "regression": "an MLP regressor of the same normalised delta (MSE), fitted on the same "
    "collection",
    "nearest": "the stored delta of the training sample nearest in {space}",
    "own_label": "each eval sample overfitted towards the base's own predicted class",
    "probe": "each eval sample overfitted towards what a probe of the conditioning, fitted on "
    "the training data, predicts",
    "compute_matched": "a copy of the base trained further by train_fn for the collection and "
    "fit time",
}
LossFn = Callable[[torch.Tensor, Any], torch.Tensor]


def _fingerprint(*objs: Any) -> str:
    found: list[torch.Tensor] = []
    map_tensors(objs, lambda t: found.append(t) or t)
    return tensor_fingerprint(*found)


class _Compare:
    """One :func:`compare` call: its settings, the rows kept so far, what is left to do."""

    def __init__(self, model, train_data, eval_data, loss_fn, out_dir, kw: dict) -> None:
        if not isinstance(model, OCDModel):
            raise NotWrappedError(
                f"compare needs a wrapped model (ocdwrap.wrap(base, layer=...)), got a "
                f"{type(model).__name__}."
            )
        self.model, self.loss_fn = model, loss_fn
        self.train_data, self.eval_data = train_data, eval_data
        self.out_dir = os.fspath(out_dir)
        self.__dict__.update(kw)
        self.generators = dict(self.generators or {})
        self.metrics = dict(self.metrics or {})
        self.fit_args = self.fit_args or FitArgs(seed=self.seed)
        self.wanted = self._wanted(self.rows)
        self.store: DeltaStore | None = None
        self.fitted: dict[str, Any] = {}

    def _wanted(self, rows: Sequence[str] | None) -> list[str]:
        for name, gen in self.generators.items():
            if name in ROWS:
                raise ConfigError(f"generators={{{name!r}: ...}}: {name!r} is a built-in row.")
            if not isinstance(gen, Generator):
                raise ConfigError(
                    f"generators[{name!r}] is a {type(gen).__name__} without fit(model, store, "
                    "args) and generate(model, cond, inputs, rng) (ocdwrap.generators.Generator)."
                )
        for name, m in self.metrics.items():
            if not isinstance(m, Metric):
                raise ConfigError(f"metrics[{name!r}] must be an ocdwrap.compare.Metric.")
        if self.probe_samples is not None and (
            isinstance(self.probe_samples, bool)
            or not isinstance(self.probe_samples, int)
            or self.probe_samples < 2
        ):
            raise ConfigError(
                f"probe_samples={self.probe_samples!r}; None (all of train_data) or an int >= 2."
            )
        if not isinstance(self.num_draws, int) or self.num_draws < 1:
            raise ConfigError(f"num_draws={self.num_draws!r}; it must be an integer >= 1.")
        known = [*ROWS, *self.generators]
        asked = list(known if rows is None else rows)
        unknown = [r for r in asked if r not in known]
        if unknown:
            raise ConfigError(f"Unknown rows {unknown}; the rows are {known}.")
        # the frame is always in, and so is every generator the caller passed (never dropped)
        return [r for r in known if r in {"base", "overfit", *asked, *self.generators}]

    # --- identity and the kept rows ----------------------------------------------------------
    def _identity(self, held: LabelledSplit) -> dict[str, Any]:
        first = next(iter(self.train_data), None)
        sampling = self.sampling or self.model.sampling_config
        return {
            "eval": {
                "n": held.n,
                "data": _fingerprint(held.batches),
                "base": _fingerprint(held.pred),
            },
            "model": {"layer": self.model.layer_name, "config": self.model.config.to_dict()},
            "train": _fingerprint(split_batch(first)) if first is not None else None,
            "fit_args": self.fit_args.to_dict(),
            "sampling": sampling.to_dict(),
            "num_draws": self.num_draws,
            "seed": self.seed,
            "task": self.task,
            # how a classification loss is scored (rows computed under another rule are stale)
            "prob_floor": PROB_FLOOR,
            "metrics": sorted(self.metrics),
            "features": None
            if self.features is None
            else getattr(self.features, "__qualname__", repr(self.features)),
            "resamples": self.resamples,
            **({"probe_samples": self.probe_samples} if self.probe_samples is not None else {}),
        }

    def _source(self, name: str) -> str:
        if name in self.generators:
            t = type(self.generators[name])
            return f"{t.__module__}.{t.__qualname__}"
        if name == "compute_matched":
            return "train_fn" if self.train_fn is not None else "no train_fn"
        return ""

    def run(self) -> Comparison:
        model = self.model
        start = time.perf_counter()
        was_training = model.base_model.training
        model.base_model.eval()
        try:
            self.held, self.task = read_labelled(
                model, self.eval_data, self.loss_fn, task=self.task or "auto",
                role="eval_data", who="compare",
            )  # fmt: skip
            os.makedirs(self.out_dir, exist_ok=True)
            self.saved = SavedComparison(
                self.out_dir, self._identity(self.held), overwrite=self.overwrite
            )
            self.groups = R.group_ids(self.metrics, self.held)
            self.info = {"fit_s": {}, **self.saved.info}
            self.spent = self.info.get("seconds", 0.0)
            self.start = start
            pending = [
                r for r in self.wanted
                if r not in self.saved.rows or self.saved.rows[r].source != self._source(r)
            ]  # fmt: skip
            self._base(pending)
            self._label_rows(pending)
            self._generator_rows(pending)
            if "compute_matched" in pending:
                self._compute_matched()
        finally:
            model.base_model.train(was_training)
        comparison = self._comparison(final=True)
        self.saved.write(comparison)
        model.compare_report = comparison  # the model card reports it
        return comparison

    # --- keeping a row -------------------------------------------------------------------------
    def _describe(self, name: str) -> str:
        if name in self.generators:
            return f"the caller's generator {self._source(name)}"
        space = (
            "the features= space"
            if self.features is not None
            else ("conditioning space (standardised as the generator standardises it)")
        )
        return DESCRIPTIONS[name].format(
            generator=self.model.config.generator, k=self.num_draws, space=space
        )

    def _keep(self, name: str, scored: R.Scored | None, *, build: float | None = 0.0,
              note: str = "", skipped: str | None = None) -> None:  # fmt: skip
        row = Row(name, self._describe(name), uses_eval_labels=name in USES_EVAL_LABELS,
                  skipped=skipped, note=note, source=self._source(name))  # fmt: skip
        if scored is not None:
            scored.loss = scored.loss.detach().double().cpu()  # the bootstrap's, on any device
            target = self.held.target
            try:
                row.metrics = R.extra_metrics(self.metrics, scored.pred, target, self.groups)
            except OCDError:
                raise
            except Exception as e:
                self._failed(name, "a metric", e)
            row.loss = float(scored.loss.mean())
            row.metric = R.task_metric(self.task, scored.pred, target)
            row.build_seconds = build
            base_s = self.info.get("base_predict_s") or scored.seconds
            row.predict_time = scored.seconds / max(base_s, 1e-12)
            self._share(row, scored.loss)
        self.saved.save_row(row, None if scored is None else scored.loss)
        self.saved.write(self._comparison(final=False))
        logger.info(
            "ocdwrap compare: %s %s", name, skipped or f"loss {row.loss:.4g}, share {row.share}"
        )

    def _share(self, row: Row, loss: torch.Tensor) -> None:
        """The row's share of the base -> bound gap (the base's own is 0 by definition, set
        when the bound arrives), in loss with its interval, and in the task metric."""
        if row.name == "base":
            return
        base = self.saved.rows.get("base")
        bound = row if row.name == "overfit" else self.saved.rows.get("overfit")
        losses = {**self.saved.losses, row.name: loss}
        if base is None or bound is None:
            return
        row.share, row.share_low, row.share_high = paired_share(
            losses["base"], losses["overfit"], loss, resamples=self.resamples, seed=self.seed
        )
        gap = base.metric - bound.metric
        if abs(gap) > 1e-12:
            row.share_metric = 100.0 * (base.metric - row.metric) / gap + 0.0
        if row.name == "overfit" and row.share is not None:
            base.share = base.share_low = base.share_high = 0.0
            base.share_metric = 0.0 if abs(gap) > 1e-12 else None

    def _failed(self, name: str, what: str, e: BaseException) -> None:
        raise RowFailedError(
            f"Row {name!r} failed: {what} raised {type(e).__name__}: {e}. The rows finished "
            f"before it are kept in {os.path.join(self.out_dir, COMPARISON_NAME)}; a rerun "
            "resumes from them."
        ) from e

    def _comparison(self, final: bool) -> Comparison:
        order = [*ROWS, *self.generators]
        kept = [self.saved.rows[n] for n in order if n in self.saved.rows]
        free = [self.saved.rows.get(n) for n in ("own_label", "probe")]
        shares = [r.share for r in free if r is not None and r.share is not None]
        self.info["seconds"] = self.spent + time.perf_counter() - self.start
        c = Comparison(
            task=self.task, n=self.held.n, layer=self.model.layer_name,
            metric="accuracy" if self.task == "classification" else "rmse", rows=kept,
            higher_is_better={k: m.higher_is_better for k, m in self.metrics.items()},
            ceiling=min(100.0, max(0.0, max(shares))) if shares else None,
            resamples=self.resamples, identity=self.saved.identity, info=dict(self.info),
            seconds=self.info["seconds"],
        )  # fmt: skip
        if final:
            c.best, c.verdict = verdict(
                kept, self.saved.losses, resamples=self.resamples, seed=self.seed
            )
        else:
            c.verdict = "incomplete: rows are still being computed."
        return c

    # --- the rows ------------------------------------------------------------------------------
    def _base(self, pending: list[str]) -> None:
        scored = R.base_row(self.model, self.held)
        self.info["base_predict_s"] = scored.seconds
        if "base" in pending:
            self._keep("base", scored)

    def _label_rows(self, pending: list[str]) -> None:
        """overfit, own_label and probe: headroom's rows, in one pass over the eval samples."""
        todo = [r for r in ("overfit", "own_label", "probe") if r in pending]
        if not todo:
            return
        if "own_label" in todo and self.task != "classification":
            todo.remove("own_label")
            self._keep("own_label", None, skipped=(
                "regression: the base's own prediction as the target has zero gradient (the "
                "loss is at its minimum), so the row would equal the base"
            ))  # fmt: skip
        probe_out, build = None, 0.0
        if "probe" in todo:
            start = time.perf_counter()
            train, _ = read_labelled(
                self.model, self.train_data, self.loss_fn, task=self.task,
                role="train_data", who="compare", keep_batches=False,
                max_samples=self.probe_samples,
            )  # fmt: skip
            probe_out, info, _ = probe_step(
                self.held, train, self.task, seed=self.seed, train_name="train_data"
            )
            build = time.perf_counter() - start
            self.info["probe"] = {k: v for k, v in info.items() if k != "mixture_classes"}
        names = {"own_label": "own_label", "probe": "probe"}
        scored = score_label_rows(
            self.model, self.held, self.loss_fn, self.task, probe_out,
            rows=[names[r] for r in todo if r in names],
        )  # fmt: skip
        for row in todo:
            s = scored[row]
            note = ""
            if row == "probe":
                p = self.info["probe"]
                note = f"probe: {p['source']}; its own loss on the eval samples {p['loss']:.4f}"
            self._keep(row, R.Scored(s["loss"], s["pred"], s["seconds"]),
                       build=build if row == "probe" else 0.0, note=note)  # fmt: skip

    def _collection(self) -> DeltaStore:
        """The collection in out_dir (collected, resumed or reused) and what it cost in all."""
        if self.store is None:
            before = held_collection(self.out_dir)
            start = time.perf_counter()
            self.store = collect(
                self.model, self.train_data, self.loss_fn, self.out_dir,
                overwrite=self.overwrite, progress=self.progress,
            )  # fmt: skip
            took = time.perf_counter() - start
            self.info["collect_s"] = collection_seconds(self.out_dir, before, self.store, took)
        return self.store

    def _fit(self, key: str, gen: Any) -> float:
        store = self._collection()
        start = time.perf_counter()
        try:
            gen.fit(self.model, store, self.fit_args)
        except OCDError:
            raise
        except Exception as e:
            self._failed(key, "the generator's fit", e)
        self.info["fit_s"][key] = time.perf_counter() - start
        self.fitted[key] = gen
        return self.info["fit_s"][key]

    def _score(self, name: str, gen: Any, fit_key: str, draws: int = 1, note: str = "") -> None:
        overrides = (self.sampling or self.model.sampling_config).to_dict()
        overrides = {k: v for k, v in overrides.items() if k not in ("num_draws", "seed")}
        try:
            with self.model.sampling(**overrides):
                scored = R.score_generator(
                    self.model, gen, self.held, self.loss_fn, self.task,
                    draws=draws, seed=self.seed, name=name,
                )  # fmt: skip
        except OCDError:
            raise
        except Exception as e:
            self._failed(name, "the generator's generate", e)
        collect_s = self.info.get("collect_s")
        build = None if collect_s is None else collect_s + self.info["fit_s"][fit_key]
        if collect_s is None:
            note = (note + "; " if note else "") + "build time without the collection's (unknown)"
        self._keep(name, scored, build=build, note=note)

    def _generator_rows(self, pending: list[str]) -> None:
        own_kind = self.model.config.generator
        need_ocd = {"ocd", "ocd_k"} & set(pending) or (
            "compute_matched" in pending and "ocd" not in self.info["fit_s"]
            and self.train_fn is not None
        )  # fmt: skip
        if need_ocd:
            self._fit("ocd", HypernetworkGenerator(progress=self.progress))
        for name, draws in (("ocd", 1), ("ocd_k", self.num_draws)):
            if name in pending:
                self._score(name, self.fitted["ocd"], "ocd", draws)
        if "regression" in pending:
            if own_kind == "regression" and "ocd" in self.fitted:
                self.info["fit_s"]["regression"] = self.info["fit_s"]["ocd"]
                self.fitted["regression"] = self.fitted["ocd"]
            else:
                self._fit("regression", RegressionGenerator(progress=self.progress))
            self._score("regression", self.fitted["regression"], "regression")
        if "nearest" in pending:
            train = self.train_data if self.features is not None else None
            self._fit("nearest", NearestNeighbour(self.features, train))
            self._score("nearest", self.fitted["nearest"], "nearest")
        for name, gen in self.generators.items():
            if name in pending:
                self._fit(name, gen)
                self._score(name, gen, name)

    def _compute_matched(self) -> None:
        if self.train_fn is None:
            self._keep("compute_matched", None, skipped=(
                "no train_fn given: pass train_fn=lambda base_copy, seconds: ... to train a "
                "copy of the base further for the time OCD's collection and fit took"
            ))  # fmt: skip
            return
        if "collect_s" not in self.info:
            self._collection()
        collect_s, fit_s = self.info.get("collect_s"), self.info["fit_s"]["ocd"]
        seconds = (collect_s or 0.0) + fit_s
        try:
            scored, took = R.compute_matched(
                self.model, self.train_fn, seconds, self.held, self.loss_fn, self.task
            )
        except OCDError:
            raise
        except Exception as e:
            self._failed("compute_matched", "train_fn", e)
        self.info["compute_matched"] = {"seconds": seconds, "took": took}
        what = "collection" if collect_s is not None else "collection time unknown, so the fit"
        note = (
            f"train_fn ran {took:.1f} s for {seconds:.1f} s asked (the {what}"
            f"{f' {collect_s:.1f} s + fit {fit_s:.1f} s' if collect_s is not None else f' {fit_s:.1f} s'})"
        )
        self._keep("compute_matched", scored, build=took, note=note)


def compare(
    model: OCDModel,
    train_data: Iterable,
    eval_data: Iterable,
    loss_fn: LossFn,
    *,
    out_dir: str | os.PathLike,
    rows: Sequence[str] | None = None,
    num_draws: int = 5,
    train_fn: Callable[[torch.nn.Module, float], Any] | None = None,
    metrics: Mapping[str, Metric] | None = None,
    task: str | None = None,
    seed: int = 0,
    progress: bool = True,
    fit_args: FitArgs | None = None,
    sampling: SamplingConfig | None = None,
    generators: Mapping[str, Any] | None = None,
    features: Callable[[Any], torch.Tensor] | None = None,
    overwrite: bool = False,
    resamples: int = 1000,
    probe_samples: int | None = None,
) -> Comparison:
    """OCD against every control, scored on labelled eval data: the verdict as one call.

    On a wrapped model (:func:`ocdwrap.wrap`): collects on ``train_data`` into ``out_dir`` (or
    resumes / reuses the collection there, as :func:`ocdwrap.collect` does, refusing one of
    another model or config unless ``overwrite=True``), fits the generators the rows need, and
    scores every row on ``eval_data`` with ``loss_fn``. The rows (``rows=`` picks some; base and
    overfit frame every share and are always in, and so is every entry of ``generators``):
    base, overfit (the bound), ocd, ocd_k (``num_draws`` draws), regression, nearest
    (``features=`` sets its distance), own_label, probe, compute_matched (needs
    ``train_fn(base_copy, seconds)``), and one per entry of ``generators`` (objects with ``fit``
    and ``generate``: :mod:`ocdwrap.generators`).
    docs/compare.md describes each row and how to read the verdict.

    Every finished row is written to ``out_dir/comparison.json`` at once; a rerun (or a run
    after an interruption) with the same eval data, model, training data and settings takes
    the rows kept there and computes only the others; one with others is refused
    (:class:`ComparisonExistsError`) unless ``overwrite=True``, which starts afresh. The
    configured generator is fitted on ``model`` itself (it predicts with it afterwards).

    Args:
        fit_args: the generators' :class:`FitArgs` (default ``FitArgs(seed=seed)``).
        sampling: sampling settings for the generator rows (default: the model's own);
            ``num_draws`` and ``seed`` come from this call.
        metrics: extra scores, name -> :class:`Metric`.
        task: 'classification', 'regression' or None (classification for (B, C) outputs with
            integer labels).
        resamples: the paired bootstrap's resamples (seeded with ``seed``).
        probe_samples: fit the probe on the first ``probe_samples`` samples of ``train_data``
            (None: all of them; its cross-validated fit grows with the samples, e.g. 58 s for
            20k LeNet5 samples on two CPU cores).

    Example:
        >>> c = ocdwrap.compare(model, train_loader, test_loader, ce, out_dir="runs/cmp",
        ...                     train_fn=lambda base, s: train_for(base, s))
        >>> print(c)                    # the table and the verdict
        >>> c.row("ocd_k").share, c.best
    """
    if task not in (None, "auto", "classification", "regression"):
        raise ConfigError(f"task={task!r}; choose 'classification', 'regression' or None.")
    kw = dict(
        rows=rows, num_draws=num_draws, train_fn=train_fn, metrics=metrics, task=task,
        seed=seed, progress=progress, fit_args=fit_args, sampling=sampling,
        generators=generators, features=features, overwrite=overwrite, resamples=resamples,
        probe_samples=probe_samples,
    )  # fmt: skip
    return _Compare(model, train_data, eval_data, loss_fn, out_dir, kw).run()
