"""One benchmark seed's experiment: the shared rows through :func:`ocdwrap.compare`, and what a
domain adds around them.

:func:`run_compare` is the part that is the same in every domain, and it is the library's own
code path: wrap the trained base at one layer and call ``ocdwrap.compare``, which collects,
fits and scores base, overfit (the bound), ocd, ocd_k, regression, nearest, own_label, probe and
compute_matched (the domain's own training continued for the collection and fit time) on the
test data. A domain passes its own distance for ``nearest`` (``features=``), its own metrics
(``metrics=``), its own training (``train_fn=``) and its ablations that fit the generator
interface (``generators=``, e.g. :class:`ocdwrap.generators.GlobalScale`); the ablations that
do not (another layer, every layer overfitted, a truncated rank, the full-matrix UNet) are rows
the script adds with the helpers here (:func:`alternative_layer_row`, :func:`overfit_all_row`).

:func:`base_row` trains the base; :func:`headroom_info` runs ``ocdwrap.headroom`` before any
collection. The row tables every script shares are built by :func:`table_rows`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ocdwrap
from ocdwrap.analysis.uncertainty import misclassification_report
from ocdwrap.compare import ROWS, Metric
from ocdwrap.compare import Row as CompareRow

from .cli import recorded
from .controls import Agreement, alternative_layer, overfit_all_layers
from .datasets import tensor_loader
from .results import Results, Row
from .scoring import Task, evaluate_module
from .timing import log, timed
from .zoo import continue_training, train_base

# the rows ocdwrap.compare computes, in the names of its table (and of every benchmark JSON)
COMPARE_ROWS = ROWS

# every table's row labels; a script overrides some (its layer, its nearest-neighbour space)
LABELS = {
    "base": "base",
    "compute_matched": "base + compute-matched extra training",
    "ocd": "OCD, 1 draw",
    "ocd_k": "OCD(5) ensemble",
    "global": "no scaling (global ρ), 1 draw",
    "regression": "regression generator (no diffusion)",
    "nearest": "nearest neighbour ({space})",
    "own_label": "overfit {layer} on test with the base's own predicted label (no labels)",
    "probe": "overfit {layer} on test towards a probe's prediction (no test labels)",
    "overfit": "overfit {layer} on test (Adam 5e-4 × 3; upper bound)",
}


def table_rows(
    order: Sequence[str | Row],
    *,
    layer: str,
    space: str,
    labels: Mapping[str, str] | None = None,
    paper: Mapping[str, Mapping[str, str]] | None = None,
) -> list[Row]:
    """The rows of a table in ``order``: each a shared row's key (labelled from :data:`LABELS`
    with ``layer`` and the nearest neighbour's ``space``, or ``labels``' own) or a script's own
    :class:`Row`; ``paper`` gives the paper's numbers by key."""
    labels, paper = labels or {}, paper or {}
    out = []
    for item in order:
        if isinstance(item, Row):
            out.append(item)
            continue
        label = labels.get(item, LABELS[item]).format(layer=layer, space=space)
        out.append(Row(item, label, dict(paper.get(item, {}))))
    return out


def train_fn_for(
    loader: Iterable, task: Task, *, device: str, seed: int, lr: float = 1e-4
) -> tuple[Callable[[nn.Module, float], nn.Module], dict[str, Any]]:
    """compare's ``train_fn`` for a base trained by :func:`benchmarks.zoo.train_base`: the copy
    trained further (fresh Adam ``lr``, the task's loss) on ``loader`` for the seconds asked;
    and the dict it records the steps in."""
    record: dict[str, Any] = {"lr": lr}

    def train(model: nn.Module, seconds: float) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        record["steps"] = continue_training(
            model, loader, task.loss_fn, seconds=seconds, lr=lr, device=device, seed=seed
        )
        return model

    return train, record


@dataclass
class CompareRun:
    """What :func:`run_compare` measured: ``rows`` (row -> metrics), ``info`` (timings, the
    comparison itself under ``comparison``) and the uncertainty report when asked for."""

    rows: dict[str, dict[str, float]]
    info: dict[str, Any]
    uncertainty: Any = None


def row_metrics(task: Task, row: CompareRow) -> dict[str, float]:
    """A compare row in the domain's metrics: ``task.metrics`` of its mean loss and accuracy
    (classification), then the row's ``metrics=`` under their own names."""
    res = {"loss": row.loss, "accuracy": row.metric if task.kind == "classification" else None}
    return {**task.metrics(res), **row.metrics}


def run_compare(
    base: nn.Module,
    layer: str,
    cfg: ocdwrap.OCDConfig,
    train_loader: Iterable,
    test_loader: Iterable,
    task: Task,
    out_dir: str,
    *,
    fit_args: ocdwrap.FitArgs,
    sampling: ocdwrap.SamplingConfig,
    rows: Sequence[str] | None = None,
    draws: int = 5,
    seed: int = 0,
    train_fn: Callable[[nn.Module, float], Any] | None = None,
    train_record: dict[str, Any] | None = None,
    features: Callable[[Any], torch.Tensor] | None = None,
    metrics: Mapping[str, Metric] | None = None,
    generators: Mapping[str, Any] | None = None,
    progress: bool = False,
    tag: str = "",
    agreement_samples: int = 2000,
    uncertainty: bool = False,
    after: Callable[[ocdwrap.OCDModel, dict[str, Any]], None] | None = None,
    to_metrics: Callable[[CompareRow], dict[str, float]] | None = None,
) -> CompareRun:
    """``ocdwrap.compare`` of ``base`` wrapped at ``layer`` with ``cfg`` and ``sampling``, on
    ``train_loader`` (collected) and ``test_loader`` (scored), every row in the domain's
    metrics (``to_metrics``, default :func:`row_metrics`).

    ``rows``: compare's rows (default all; base and overfit are always in); ``generators``:
    more rows (e.g. ``{"global": GlobalScale()}``); ``features``: the nearest neighbour's
    space (default compare's, the standardised conditioning); ``train_fn``: the
    compute-matched row's training (``train_record``: what it recorded, kept in
    ``info["compute_matched"]``). After compare the model holds OCD's fitted generator:
    ``info["agreement"]["ocd"]`` compares its deltas with the overfit-on-test ones on the first
    ``agreement_samples`` test samples; ``uncertainty=True`` (classification) runs
    ``misclassification_report`` with K=``draws``; ``after(model, info)`` adds a script's own
    rows with it. ``base`` is unwrapped again before returning.
    """
    tag = f"[{tag or layer}] "
    info: dict[str, Any] = {"layer": layer, **recorded(cfg, fit_args, sampling), "agreement": {}}
    model = ocdwrap.wrap(base, layer=layer, config=cfg, sampling=sampling)
    out: dict[str, dict[str, float]] = {}
    report = None
    logger = logging.getLogger("ocdwrap")
    level, handler = logger.level, _LogLines()
    logger.setLevel(logging.INFO)  # compare's line per row, as benchmarks.timing.log prints
    logger.addHandler(handler)
    try:
        log(f"{tag}ocdwrap.compare: rows {'all' if rows is None else list(rows)}, K={draws}")
        comparison, seconds = timed(
            lambda: ocdwrap.compare(
                model, train_loader, test_loader, task.loss_fn, out_dir=out_dir, rows=rows,
                num_draws=draws, train_fn=train_fn, metrics=metrics, task=task.kind, seed=seed,
                progress=progress, fit_args=fit_args, sampling=sampling, generators=generators,
                features=features, overwrite=True,
            )
        )  # fmt: skip
        log(f"{tag}compare in {seconds:.0f} s:\n{comparison}")
        convert = to_metrics or (lambda r: row_metrics(task, r))
        for r in comparison.rows:
            if r.skipped is None:
                out[r.name] = convert(r)
        _record(info, comparison, out_dir, model, train_record)
        fitted = model.hypernet is not None
        if fitted and agreement_samples:
            agree = Agreement(model, test_loader, task, agreement_samples)
            rng = torch.Generator(device=model.device).manual_seed(seed)
            info["agreement"]["ocd"] = agree.score(
                lambda x, y, cond, p: model.generate(cond, rng=rng)
            )
            log(f"{tag}agreement with overfit-on-test deltas: {info['agreement']['ocd']}")
        if fitted and uncertainty and task.kind == "classification":
            report = misclassification_report(
                model, test_loader, num_draws=draws, seed=seed, loss_fn=task.loss_fn
            )
            info["uncertainty"] = report.to_dict()
            log(f"{tag}uncertainty:\n{report.table()}")
        if after is not None:
            after(model, out)
    finally:
        logger.setLevel(level)
        logger.removeHandler(handler)
        model.unload()
    return CompareRun(out, info, report)


class _LogLines(logging.Handler):
    """ocdwrap's log lines during compare (one per finished row, and any warning) as
    :func:`benchmarks.timing.log` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        log(level + record.getMessage())


def _record(info: dict, comparison: Any, out_dir: str, model: Any, train: dict | None) -> None:
    """What the notes read from a comparison: its timings, the collection's summary, the
    scale model's last losses, the compute-matched training, and the comparison itself."""
    c = comparison.info
    fit_s = c.get("fit_s", {})
    info["collect_s"] = c.get("collect_s")
    info["fit_s"] = fit_s.get("ocd")
    info["fit_regression_s"] = fit_s.get("regression")
    if info["collect_s"] is not None:
        info["collect_summary"] = ocdwrap.DeltaStore(out_dir).manifest["summary"]
    fit = model.fit_report
    if fit is not None:
        info["fit_final_loss"] = fit.final_loss
        last = fit.scale_losses[-100:]
        info["fit_final_scale_dB"] = sum(last) / max(len(last), 1)
    if "compute_matched" in c:
        info["compute_matched"] = {**c["compute_matched"], **(train or {})}
    info["comparison"] = comparison.to_dict()


def add_run(res: Results, seed: int, run: CompareRun, key: str = "ocd", prefix: str = "") -> None:
    """Every row of ``run`` into ``res`` (as ``prefix + row``, the rows ``res`` has); its info
    under ``res.info[seed][key]``; the compute-matched training also under
    ``res.info[seed]["compute_matched"]`` (the notes' place for it)."""
    for k, v in run.rows.items():
        if prefix + k in res.keys:
            res.add(seed, prefix + k, v)
    info = res.info.setdefault(seed, {})
    info[key] = run.info
    if not prefix and "compute_matched" in run.info:
        info["compute_matched"] = run.info["compute_matched"]


def base_row(
    res: Results,
    seed: int,
    base: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test_loader: Iterable,
    task: Task,
    *,
    batch_size: int,
    val_batch_size: int,
    max_epochs: int,
    patience: int,
    device: str,
    progress: bool = False,
) -> nn.Module:
    """Train ``base`` to convergence (Adam, early stopping on ``val``), record how in
    ``res.info[seed]["base_training"]``, add its "base" row (compare's own replaces it when a
    comparison runs); return an untouched copy of it (for the all-layers control)."""
    tr = train_base(
        base,
        tensor_loader(*train, batch_size, shuffle=True, seed=seed),
        tensor_loader(*val, val_batch_size),
        task.loss_fn,
        max_epochs=max_epochs,
        patience=patience,
        device=device,
        seed=seed,
        progress=progress,
    )
    info = res.info.setdefault(seed, {})
    info["base_training"] = {
        "epochs_run": tr.epochs_run,
        "best_epoch": tr.best_epoch,
        "stopped_early": tr.stopped_early,
        "best_val_loss": tr.best_val_loss,
        "seconds": tr.seconds,
    }
    log(f"  {info['base_training']}")
    base.eval()
    pristine = copy.deepcopy(base)
    res.add(seed, "base", evaluate_module(base, test_loader, task, device))
    log(f"  base: {res.per_seed[seed]['base']}")
    return pristine


def overfit_all_row(
    res: Results,
    seed: int,
    pristine: nn.Module,
    test_loader: Iterable,
    task: Task,
    cfg: ocdwrap.OCDConfig,
    *,
    device: str,
    max_samples: int | None = None,
    chunk: int = 256,
) -> None:
    """The "overfit ALL layers on test" row (the collection's lr and steps), timed into
    ``res.info[seed]["overfit_all_s"]``."""
    info = res.info.setdefault(seed, {})
    log(f"overfitting every layer on each of {max_samples or 'the'} test samples")
    row, info["overfit_all_s"] = timed(
        lambda: overfit_all_layers(
            pristine, test_loader, task, lr=cfg.overfit_lr, steps=cfg.overfit_steps,
            chunk=chunk, max_samples=max_samples, device=device,
        )
    )  # fmt: skip
    res.add(seed, "overfit_all", row)
    log(f"  overfit all layers: {row} ({info['overfit_all_s']:.0f} s)")


def alternative_layer_row(
    res: Results,
    seed: int,
    base: nn.Module,
    main_layer: str,
    cfg: ocdwrap.OCDConfig,
    calibration: Iterable,
    train_loader: Iterable,
    test_loader: Iterable,
    task: Task,
    out_dir: str,
    *,
    linear_only: bool,
    device: str,
    progress: bool = False,
    fit_args: ocdwrap.FitArgs,
    sampling: ocdwrap.SamplingConfig,
    metrics: Mapping[str, Metric] | None = None,
    to_metrics: Callable[[CompareRow], dict[str, float]] | None = None,
) -> None:
    """The paper's "alternative layer" row: ``ocdwrap.compare``'s ocd row (1 draw) on the layer
    :func:`alternative_layer` ranks highest after ``main_layer``; the ranking goes to
    ``res.info[seed]["selection"]``, the comparison's info to ``res.info[seed]["alt_ocd"]``."""
    info = res.info.setdefault(seed, {})
    alt, info["selection"] = alternative_layer(
        base, main_layer, calibration, task, linear_only=linear_only, seed=seed, device=device
    )
    log(f"alternative layer: {alt}; ranking {info['selection']['ranking']}")
    run = run_compare(
        base, alt, cfg, train_loader, test_loader, task, out_dir, fit_args=fit_args,
        sampling=sampling, rows=("ocd",), seed=seed, progress=progress, agreement_samples=0,
        metrics=metrics, to_metrics=to_metrics,
    )  # fmt: skip
    res.add(seed, "alt", run.rows["ocd"])
    info["alt_ocd"] = run.info


def headroom_info(
    res: Results,
    seed: int,
    base: nn.Module,
    layer: str,
    cfg: ocdwrap.OCDConfig,
    val_loader: Iterable,
    task: Task,
    *,
    max_samples: int = 2000,
    train_loader: Iterable | None = None,
    max_train_samples: int | None = 10000,
) -> dict[str, Any] | None:
    """``ocdwrap.headroom`` of ``base`` at ``layer`` on the validation split (before any
    collection), with the collection's overfit settings; stored in ``res.info[seed]["headroom"]``.
    Its probe is fitted on ``train_loader`` (the samples the generator will be trained on, at
    most ``max_train_samples``), as a generator would be.

    Its ``ceiling`` is the prediction that docs/results.md checks against the shares OCD and the
    regression generator then capture on the test split. ``max_samples=0`` skips it.
    """
    if not max_samples:
        return None
    model = ocdwrap.wrap(base, layer=layer, config=cfg)
    try:
        report, seconds = timed(
            lambda: ocdwrap.headroom(
                model,
                val_loader,
                task.loss_fn,
                max_samples=max_samples,
                task=task.kind,
                seed=seed,
                train_loader=train_loader,
                max_train_samples=max_train_samples,
            )  # fmt: skip
        )
    finally:
        model.unload()
    info = {**report.to_dict(), "seconds": seconds}
    res.info.setdefault(seed, {})["headroom"] = info
    log(f"[{layer}] headroom on {report.n} held-out samples ({seconds:.0f} s): {report.verdict}")
    return info


def pixels(x: torch.Tensor) -> torch.Tensor:
    """The nearest neighbour's distance of the image and tabular benchmarks: the raw input
    (pixels, standardised features), flattened."""
    return x.float().reshape(x.shape[0], -1)
