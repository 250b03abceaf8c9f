"""Hugging Face ``Trainer``: collect and fit OCD when base training ends, with one callback.

Example:
    >>> from ocdwrap.integrations.transformers import OCDTrainerCallback
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collator,
    ...                   callbacks=[OCDTrainerCallback(layer="classifier")])
    >>> trainer.train()        # trains the base model, then overfits, collects and fits OCD
    >>> trainer.save_model()   # the base model, as usual; OCD left it untouched
    >>> ocd = ocdwrap.OCDModel.from_pretrained(model, f"{args.output_dir}/ocd_adapter")

When training ends (after ``load_best_model_at_end`` has restored the best weights) the callback
wraps the trained model, overfits the target layer on every training sample in order (the
training set and collator the Trainer used, without shuffling), fits the hypernetwork, saves
only the adapter to ``<output_dir>/ocd_adapter`` and gives the model back unwrapped, so
``trainer.save_model()`` and ``push_to_hub`` see the plain base model. Under ``accelerate launch``
or ``torchrun`` the collection is sharded over the processes and the fit runs with DDP
(:mod:`ocdwrap.distributed`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..config import FitArgs, OCDConfig, SamplingConfig
from ..distributed import collect_distributed
from ..evaluation import evaluate_ocd
from ..fit import FitReport, fit
from ..fit_checkpoint import remove_checkpoint
from ..model import OCDModel
from ..processes import Processes
from ..store import remove
from ..wrapping import wrap

logger = logging.getLogger("ocdwrap")

LossFn = Callable[[torch.Tensor, Any], torch.Tensor]

ADAPTER_DIR = "ocd_adapter"
DELTAS_DIR = "ocd_deltas"
CHECKPOINT_DIR = "ocd_fit_checkpoint"


# --- the per-sample loss a Hugging Face model trains with --------------------------------------


def _cross_entropy(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if pred.dim() == 3:  # token classification: (B, T, C), labels (B, T) with -100 ignored
        loss = F.cross_entropy(
            pred.float().flatten(0, 1), labels.flatten(), reduction="none", ignore_index=-100
        )
        return loss.view(labels.shape).sum(1)
    return F.cross_entropy(pred.float(), labels, reduction="none")


def _mse(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    B = pred.shape[0]
    return ((pred.float().reshape(B, -1) - labels.float().reshape(B, -1)) ** 2).mean(1)


def _bce(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(pred.float(), labels.float(), reduction="none")
    return loss.reshape(pred.shape[0], -1).mean(1)


def hf_loss_fn(model: nn.Module | Any) -> LossFn:
    """The per-sample version of the loss a Hugging Face model computes from ``labels``.

    Follows ``config.problem_type`` the way ``*ForSequenceClassification`` does: regression
    (also when ``num_labels == 1``) -> squared error, multi-label -> binary cross-entropy,
    otherwise cross-entropy (per token, summed per sample, for ``(B, T, C)`` logits).

    Example:
        >>> loss = hf_loss_fn(model)            # model.config.num_labels == 3
        >>> loss(logits, labels).shape          # (B,)
    """
    cfg = getattr(model, "config", model)
    problem = getattr(cfg, "problem_type", None)
    if problem == "regression" or (problem is None and getattr(cfg, "num_labels", 2) == 1):
        return _mse
    if problem == "multi_label_classification":
        return _bce
    return _cross_entropy


# --- the callback -------------------------------------------------------------------------------


class OCDTrainerCallback(TrainerCallback):
    """Collect the deltas and fit OCD once ``Trainer.train()`` ends; save only the adapter.

    Args:
        layer: the target module's name (``"classifier"``, ``"classifier.out_proj"``) or
            ``"auto"`` (the paper's loss-entropy selection on the first
            ``calibration_samples`` training samples).
        config: an :class:`~ocdwrap.OCDConfig` (defaults to ``OCDConfig()``).
        loss_fn: per-sample loss ``loss_fn(logits, labels)``; default :func:`hf_loss_fn`.
        adapter_dir: where the adapter goes; default ``<output_dir>/ocd_adapter``.
        deltas_dir: the collection directory; default ``<output_dir>/ocd_deltas``. An
            interrupted collection there is resumed; one of another model is replaced.
        keep_deltas: keep the collection (and the fit checkpoint) after the adapter is saved.
        train_dataset, data_collator: the data to overfit; default: the Trainer's own training
            set and collator (taken from its training DataLoader, read in order).
        batch_size: collection batch size; default ``args.per_device_eval_batch_size``.
        max_samples: collect the first ``max_samples`` training samples only.
        eval_dataset: if given, the base model and OCD are scored on it after fitting; the
            numbers go to ``metrics`` and to the Trainer's log history.
        fit_args: the :class:`~ocdwrap.FitArgs` of :func:`ocdwrap.fit` (default ``FitArgs()``).
        sampling: the adapter's sampling defaults, a :class:`~ocdwrap.SamplingConfig`.
        selection: for ``layer="auto"``, settings of :func:`ocdwrap.select_layer` (``draws``,
            ``perturbation``, ``noise_scale``, ...).
        progress: show progress bars.

    After training: ``adapter_dir`` (the saved adapter), ``layer`` (the target layer, also when
    chosen automatically), ``report`` (a :class:`~ocdwrap.FitReport`), ``metrics`` (a dict).

    Example:
        >>> cb = OCDTrainerCallback(layer="classifier", config=OCDConfig(delta="rank1"))
        >>> Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
        >>> ocd = OCDModel.from_pretrained(model, cb.adapter_dir)
    """

    def __init__(
        self,
        layer: str = "auto",
        config: OCDConfig | None = None,
        *,
        loss_fn: LossFn | None = None,
        adapter_dir: str | os.PathLike | None = None,
        deltas_dir: str | os.PathLike | None = None,
        keep_deltas: bool = False,
        train_dataset: Dataset | None = None,
        data_collator: Callable | None = None,
        batch_size: int | None = None,
        max_samples: int | None = None,
        calibration_samples: int = 256,
        eval_dataset: Dataset | None = None,
        fit_args: FitArgs | None = None,
        sampling: SamplingConfig | None = None,
        selection: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.layer = layer
        self.config = config
        self.loss_fn = loss_fn
        self._adapter_dir = os.fspath(adapter_dir) if adapter_dir is not None else None
        self._deltas_dir = os.fspath(deltas_dir) if deltas_dir is not None else None
        self.keep_deltas = keep_deltas
        self.train_dataset = train_dataset
        self.data_collator = data_collator
        self.batch_size = batch_size
        self.max_samples = max_samples
        self.calibration_samples = calibration_samples
        self.eval_dataset = eval_dataset
        self.fit_args = fit_args
        self.sampling = sampling
        self.selection = dict(selection or {})
        self.progress = progress
        self.adapter_dir: str | None = None
        self.report: FitReport | None = None
        self.metrics: dict[str, float] = {}

    # the loader OCD reads: the Trainer's data and collator, in order
    def _loader(self, dataset: Dataset, collate: Callable | None, batch_size: int) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, shuffle=False)

    def _train_data(self, train_dataloader: Any) -> tuple[Dataset, Callable | None]:
        if self.train_dataset is not None:
            return self.train_dataset, self.data_collator
        if train_dataloader is None:
            raise ValueError(
                "OCDTrainerCallback found no training data: the Trainer passed no train_dataloader. "
                "Pass train_dataset= (and data_collator=) to the callback."
            )
        collate = self.data_collator or getattr(train_dataloader, "collate_fn", None)
        return train_dataloader.dataset, collate

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("OCDTrainerCallback.on_train_end got no model from the Trainer.")
        dataset, collate = self._train_data(train_dataloader)
        bs = self.batch_size or args.per_device_eval_batch_size
        loader = self._loader(dataset, collate, bs)
        loss_fn = self.loss_fn or hf_loss_fn(model)
        out = args.output_dir or "."
        adapter_dir = self._adapter_dir or os.path.join(out, ADAPTER_DIR)
        deltas_dir = self._deltas_dir or os.path.join(out, DELTAS_DIR)
        checkpoint_dir = os.path.join(os.path.dirname(deltas_dir) or ".", CHECKPOINT_DIR)
        procs = Processes.current()
        show = self.progress and procs.is_main

        was_training = model.training
        select = {"max_samples": self.calibration_samples, "progress": show, **self.selection}
        ocd = wrap(
            model,
            layer=self.layer,
            config=self.config,
            calibration=loader if self.layer == "auto" else None,
            loss_fn=loss_fn,
            sampling=self.sampling,
            **(select if self.layer == "auto" else {}),
        )
        self.layer = ocd.layer_name
        try:
            # one process: collect_distributed is ocdwrap.collect; fit runs DDP when W > 1
            store = collect_distributed(
                ocd,
                loader,
                loss_fn,
                deltas_dir,
                max_samples=self.max_samples,
                overwrite=True,
                progress=show,
            )
            self.report = fit(
                ocd, store, self.fit_args, checkpoint_dir=checkpoint_dir, progress=show
            )
            record: dict[str, Any] = {
                "ocd_layer": ocd.layer_name,
                "ocd_samples": len(store),
                "ocd_fit_loss": self.report.final_loss,
                "ocd_fit_seconds": self.report.seconds,
            }
            if self.eval_dataset is not None and procs.is_main:
                self.metrics = self._evaluate(ocd, self.eval_dataset, collate, bs, loss_fn)
                record.update(self.metrics)
            if procs.is_main:
                ocd.save_pretrained(adapter_dir, overwrite=True)
            procs.barrier()
            self.adapter_dir = adapter_dir
            state.log_history.append({**record, "step": state.global_step})
            logger.info("ocdwrap: OCD adapter for %r saved to %s", ocd.layer_name, adapter_dir)
        finally:
            ocd.unload()
            model.train(was_training)
        if not self.keep_deltas and procs.is_main:
            # the collection's and the checkpoint's own files only: anything else a user put
            # in those directories stays
            remove(deltas_dir)
            remove_checkpoint(checkpoint_dir)

    def _evaluate(
        self,
        ocd: OCDModel,
        dataset: Dataset,
        collate: Callable | None,
        batch_size: int,
        loss_fn: LossFn,
    ) -> dict[str, float]:
        task = "regression" if loss_fn is _mse else "classification"
        loader = self._loader(dataset, collate, batch_size)
        metrics: dict[str, float] = {}
        for mode in ("base", "ocd"):
            res = evaluate_ocd(ocd, loader, loss_fn, mode=mode, task=task)
            metrics[f"{mode}_eval_loss"] = res["loss"]
            if "accuracy" in res:
                metrics[f"{mode}_eval_accuracy"] = res["accuracy"]
        return metrics


__all__ = ["OCDTrainerCallback", "hf_loss_fn"]
