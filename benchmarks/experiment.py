"""One benchmark seed's experiment: the base row, OCD and its ablations, the compute-matched row.

:func:`run_ocd` is the part that is the same in every domain: wrap the trained base at one
layer, collect, fit, and score OCD, OCD(K), the global-scale ablation, the regression
generator, the nearest neighbour, the own-label overfit and the overfit-on-test bound (the rows
asked for), with how close each generator's deltas come to the overfit-on-test ones.
:func:`base_row` trains the base and :func:`compute_matched_row` trains it further for OCD's
wall time; a script adds its own rows around them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ocdwrap
from ocdwrap.analysis.uncertainty import misclassification_report

from .cli import recorded
from .controls import (
    Agreement,
    NearestNeighbour,
    alternative_layer,
    compute_matched,
    overfit_all_layers,
    pseudo_label_spec,
)
from .datasets import tensor_loader
from .results import Results
from .scoring import Task, evaluate_module, evaluate_ocd, evaluate_with_deltas
from .timing import log, timed
from .zoo import train_base

OCD_ROWS = ("ocd", "ocd_k", "global", "regression", "nn", "overfit", "pseudo")


@dataclass
class OCDRun:
    """What :func:`run_ocd` measured: ``rows`` (row -> metrics) and ``info`` (timings, stats)."""

    rows: dict[str, dict[str, float]]
    info: dict[str, Any]
    uncertainty: Any = None  # an ocdwrap.analysis.uncertainty.UncertaintyReport when asked for


def run_ocd(
    base: nn.Module,
    layer: str,
    cfg: ocdwrap.OCDConfig,
    train_loader: Iterable,
    test_loader: Iterable,
    task: Task,
    out_dir: str,
    *,
    fit_args: ocdwrap.FitArgs | None = None,
    sampling: ocdwrap.SamplingConfig | None = None,
    rows: Sequence[str] = OCD_ROWS,
    draws: int = 5,
    seed: int = 0,
    device: str = "cpu",
    nn_train: torch.Tensor | None = None,
    nn_test: torch.Tensor | None = None,
    progress: bool = False,
    tag: str = "",
    agreement_samples: int = 2000,
    uncertainty: bool = False,
    seen_loader: Iterable | None = None,
) -> OCDRun:
    """Wrap ``base`` at ``layer`` with ``cfg`` and the sampling defaults ``sampling`` (default
    ``SamplingConfig()``), collect, fit with ``fit_args`` (default ``FitArgs(seed=seed)``), and
    score the OCD rows asked for.

    Rows (each 1 draw unless said): ``ocd``; ``ocd_k`` (K=``draws`` ensemble); ``global`` (the
    same fitted generator with the training set's mean rho instead of rho(I(x))); ``regression``
    (an MLP regressor of the normalised delta fitted on the same collection, instead of
    diffusion); ``nn`` (each test input gets the stored delta of the training sample whose input
    is closest in ``nn_train``/``nn_test`` feature space, L2); ``overfit`` (each test sample
    overfitted with its true label, with the collection's optimizer, lr and steps); ``pseudo``
    (classification: the same overfit with the base model's own predicted class as the label,
    so no test label is used: plain self-training, the label-free baseline OCD must beat).

    ``info["agreement"]`` compares each generator's deltas with the overfit-on-test deltas on
    the first ``agreement_samples`` test samples (cosine, norm ratio; see :class:`Agreement`).
    ``uncertainty=True`` (classification) also runs
    :func:`ocdwrap.analysis.uncertainty.misclassification_report` with K=``draws``: the spread
    between draws as a wrong-prediction detector next to the base model's confidence, and the
    ECEs (``info["uncertainty"]``; the report itself in ``OCDRun.uncertainty``).
    ``seen_loader``: training samples the base was trained on but that were not collected;
    rows ``seen_base``, ``seen_ocd`` (1 draw) and ``seen_overfit`` score them (the authors' first
    public evaluation drew its test images from the training file: this shows what that
    protocol measures).
    ``base`` is unwrapped again before returning.
    """
    rows = [r for r in rows if r != "pseudo" or task.kind == "classification"]
    if "nn" in rows and (nn_train is None or nn_test is None):
        raise ValueError(
            "the nearest-neighbour row needs nn_train and nn_test features: pass them to "
            "run_ocd, or leave 'nn' out of rows"
        )
    fit_args = fit_args or ocdwrap.FitArgs(seed=seed)
    sampling = sampling or ocdwrap.SamplingConfig()
    info = {"layer": layer, **recorded(cfg, fit_args, sampling), "agreement": {}}
    run = _Rows(task, test_loader, rows, seed, f"[{tag or layer}] ", info, fit_args)
    model = ocdwrap.wrap(base, layer=layer, config=cfg, sampling=sampling)
    try:
        store = run.collect_and_fit(model, train_loader, out_dir, device, progress)
        if agreement_samples:
            run.agree = Agreement(model, test_loader, task, agreement_samples)
        run.generated_rows(model, draws, uncertainty)
        run.overfit_rows(model)
        if seen_loader is not None:
            run.seen_rows(model, seen_loader)
        if "nn" in rows:
            near = NearestNeighbour(store, cfg, model.weight_shape, nn_train, nn_test)
            run.delta_row("nn", "nearest neighbour", model, lambda x, y, p: near.spec(p, len(y)))
    finally:
        model.unload()
    if "regression" in rows:
        run.regression_row(base, layer, cfg, sampling, store, device, progress)
    for k, v in run.info["agreement"].items():
        log(f"{run.tag}agreement {k}: {v}")
    return OCDRun(run.out, run.info, run.uncertainty)


@dataclass
class _Rows:
    """The rows of one :func:`run_ocd` call, filled in the order the paper's table lists them."""

    task: Task
    test_loader: Iterable
    rows: Sequence[str]
    seed: int
    tag: str
    info: dict[str, Any]
    fit_args: ocdwrap.FitArgs
    out: dict[str, dict[str, float]] = field(default_factory=dict)
    agree: Agreement | None = None
    uncertainty: Any = None

    def collect_and_fit(
        self,
        model: ocdwrap.OCDModel,
        train_loader: Iterable,
        out_dir: str,
        device: str,
        progress: bool,
    ) -> ocdwrap.DeltaStore:
        cfg, tag, info = model.config, self.tag, self.info
        log(
            f"{tag}collect: overfitting {info['layer']} on every training sample ({cfg.overfit_optimizer})"
        )
        store, info["collect_s"] = timed(
            lambda: ocdwrap.collect(
                model, train_loader, self.task.loss_fn, out_dir, overwrite=True, progress=progress
            )
        )
        info["collect_summary"] = store.manifest["summary"]
        log(f"{tag}  {len(store)} deltas in {info['collect_s']:.1f} s; {store.manifest['summary']}")
        log(f"{tag}fit: {self.fit_args.steps} steps ({cfg.generator}, delta={cfg.delta})")
        report, info["fit_s"] = timed(
            lambda: ocdwrap.fit(model, store, self.fit_args, progress=progress, device=device)
        )
        info["fit_final_loss"] = report.final_loss
        last = report.scale_losses[-100:]
        info["fit_final_scale_dB"] = sum(last) / max(len(last), 1)
        log(f"{tag}  fitted in {info['fit_s']:.1f} s, final loss {report.final_loss:.4f}")
        return store

    def ocd_eval(self, model: ocdwrap.OCDModel, draws: int) -> dict[str, float]:
        return evaluate_ocd(model, self.test_loader, self.task, num_draws=draws, seed=self.seed)

    def generated_rows(self, model: ocdwrap.OCDModel, draws: int, uncertainty: bool) -> None:
        """OCD (1 draw), OCD(K), the uncertainty report and the global-scale ablation."""
        tag, info, task = self.tag, self.info, self.task
        if "ocd" in self.rows:
            self.out["ocd"], info["eval_ocd_s"] = timed(lambda: self.ocd_eval(model, 1))
            log(f"{tag}OCD (1 draw): {self.out['ocd']}")
            if self.agree:
                rng = torch.Generator(device=model.device).manual_seed(self.seed)
                info["agreement"]["ocd"] = self.agree.score(
                    lambda x, y, cond, p: model.generate(cond, rng=rng)
                )
                log(f"{tag}  agreement with overfit-on-test deltas: {info['agreement']['ocd']}")
        if "ocd_k" in self.rows:
            self.out["ocd_k"] = self.ocd_eval(model, draws)
            log(f"{tag}OCD({draws}): {self.out['ocd_k']}")
        if uncertainty and task.kind == "classification":
            self.uncertainty = misclassification_report(
                model, self.test_loader, num_draws=draws, seed=self.seed, loss_fn=task.loss_fn
            )
            info["uncertainty"] = self.uncertainty.to_dict()
            log(f"{tag}uncertainty:\n{self.uncertainty.table()}")
        if "global" in self.rows:
            with model.sampling(scale="global"):
                self.out["global"] = self.ocd_eval(model, 1)
            log(f"{tag}global rho (1 draw): {self.out['global']}")

    def seen_rows(self, model: ocdwrap.OCDModel, loader: Iterable) -> None:
        """Base, OCD (1 draw) and overfit on training samples that were not collected."""
        for key, mode in (("seen_base", "base"), ("seen_ocd", "ocd"), ("seen_overfit", "overfit")):
            self.out[key] = evaluate_ocd(model, loader, self.task, mode=mode, seed=self.seed)
            log(f"{self.tag}{mode} on training samples not collected: {self.out[key]}")

    def overfit_rows(self, model: ocdwrap.OCDModel) -> None:
        """Overfit on test with the true label, and with the base model's own predicted label."""
        if "overfit" in self.rows:
            self.out["overfit"] = evaluate_ocd(model, self.test_loader, self.task, mode="overfit")
            log(f"{self.tag}overfit on test: {self.out['overfit']}")
        if "pseudo" in self.rows:
            self.delta_row(
                "pseudo",
                "overfit on test with the base's predicted labels",
                model,
                lambda x, y, p: pseudo_label_spec(model, x, self.task),
            )

    def delta_row(self, key: str, what: str, model: ocdwrap.OCDModel, spec_fn: Any) -> None:
        """Row ``key``: the model run with the deltas ``spec_fn(x, y, position)`` chooses."""
        self.out[key] = evaluate_with_deltas(model, self.test_loader, self.task, spec_fn)
        log(f"{self.tag}{what}: {self.out[key]}")
        if self.agree:
            self.info["agreement"][key] = self.agree.score(lambda x, y, c, p: spec_fn(x, y, p))

    def regression_row(
        self,
        base: nn.Module,
        layer: str,
        cfg: ocdwrap.OCDConfig,
        sampling: ocdwrap.SamplingConfig,
        store: ocdwrap.DeltaStore,
        device: str,
        progress: bool,
    ) -> None:
        """The regression generator (no diffusion), fitted on the same collection."""
        reg_cfg = cfg.replace(generator="regression")
        reg = ocdwrap.wrap(base, layer=layer, config=reg_cfg, sampling=sampling)
        try:
            log(f"{self.tag}fit: regression generator, {self.fit_args.steps} steps")
            _, self.info["fit_regression_s"] = timed(
                lambda: ocdwrap.fit(reg, store, self.fit_args, progress=progress, device=device)
            )
            self.out["regression"] = self.ocd_eval(reg, 1)
            log(f"{self.tag}regression generator: {self.out['regression']}")
            if self.agree:
                self.info["agreement"]["regression"] = self.agree.score(
                    lambda x, y, c, p: reg.generate(c)
                )
        finally:
            reg.unload()


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
    ``res.info[seed]["base_training"]``, add its "base" row; return an untouched copy of it
    (for the compute-matched and all-layers controls, which must not see the OCD wrapper)."""
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


def add_run(res: Results, seed: int, run: OCDRun, key: str = "ocd", prefix: str = "") -> None:
    """Every row of ``run`` into ``res`` (as ``prefix + row``); its info under
    ``res.info[seed][key]``."""
    for k, v in run.rows.items():
        res.add(seed, prefix + k, v)
    res.info.setdefault(seed, {})[key] = run.info


def compute_matched_row(
    res: Results,
    seed: int,
    pristine: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    test_loader: Iterable,
    task: Task,
    *,
    batch_size: int,
    device: str,
) -> None:
    """The "compute-matched" row: ``pristine`` trained further for the wall time OCD's
    collection and fitting took (``res.info[seed]["ocd"]``)."""
    info = res.info[seed]
    seconds = info["ocd"]["collect_s"] + info["ocd"]["fit_s"]
    log(f"compute-matched control: {seconds:.1f} s more training of the base")
    loader = tensor_loader(*train, batch_size, shuffle=True, seed=seed + 1000)
    row, info["compute_matched"] = compute_matched(
        pristine, loader, test_loader, task, seconds, device=device, seed=seed
    )
    res.add(seed, "compute_matched", row)
    log(f"  {row} after {info['compute_matched']['steps']} steps")


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
    fit_args: ocdwrap.FitArgs | None = None,
    sampling: ocdwrap.SamplingConfig | None = None,
) -> None:
    """The paper's "alternative layer" row: OCD (1 draw) on the layer :func:`alternative_layer`
    ranks highest after ``main_layer`` (fitted with ``fit_args``, sampled with ``sampling``, as
    :func:`run_ocd`); the ranking goes to ``res.info[seed]["selection"]``, the
    OCD run's info to ``res.info[seed]["alt_ocd"]``."""
    info = res.info.setdefault(seed, {})
    alt, info["selection"] = alternative_layer(
        base, main_layer, calibration, task, linear_only=linear_only, seed=seed, device=device
    )
    log(f"alternative layer: {alt}; ranking {info['selection']['ranking']}")
    run = run_ocd(
        base, alt, cfg, train_loader, test_loader, task, out_dir, fit_args=fit_args,
        sampling=sampling, rows=("ocd",), seed=seed, device=device, progress=progress,
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
