"""Speech separation: the paper's Table 5 (Libri5Mix, SI-SDRi) on synthesised mixtures.

    python benchmarks/speech.py --json runs/speech.json                  # CPU default: 2 speakers, seed 0
    python -m benchmarks.speech --speakers 2 5 --seeds 0 1 2 --json runs/speech_3x2.json
    python -m benchmarks.speech --merge a.json b.json --json runs/speech.json   # runs done apart
    python -m benchmarks.speech --smoke                                  # seconds; checks the plumbing

Data (``benchmarks.speech_data``): LibriSpeech / Libri5Mix are not available offline, so speech
is synthesised with espeak-ng (speakers from its English voices and variants with their own pitch
and speed, sentences of 3-5 frequent words), resampled to 8 kHz, cut to 1-second utterances and
mixed LibriMix-style (random levels of -33 to -25 dB) into 2- and 5-speaker mixtures; training,
validation and test mixtures have disjoint sentences, and a second test split
(``test_unseen``) has speakers unseen in training. Cached in ``~/.cache/ocdwrap/speech``.
espeak-ng is a Debian package (``apt-get install espeak-ng``; ``scripts/setup.sh`` installs it).

Model (``benchmarks.speech_model``): a MulCat / Gated-LSTM separator in the spirit of Nachmani
et al. (2020): encoder Conv1d (``--kernel`` samples, 50 % hop), ``--blocks`` dual-path blocks of
MulCat steps (two bi-LSTMs of ``--hidden`` units, multiplied, concatenated with the input,
projected), then the final projection ``proj`` = ``nn.Linear(N, S * N)`` on the frame sequence
(B, frames, N) giving one mask per speaker, and a transposed-conv decoder. Trained with Adam
1e-3 on the permutation-invariant negative SI-SDR (torchmetrics) for ``--train-seconds`` of wall
time at most, early stopping on the validation mixtures (``--patience`` epochs), best epoch kept.

OCD: on ``proj``, the last projection of the network (the paper: the projection layer of the last
MulCat block); it sees every frame of a mixture, so a mixture's delta is not rank one:
``OCDConfig(delta="lowrank", delta_rank=--delta-rank)``. A sample is one mixture; its loss (the
per-sample loss of the collection, the bound and every row) is the matched negative SI-SDR.
The overfit is Adam ``--overfit-lr`` x ``--overfit-steps`` on that loss, weight only. The
conditioning is what ocdwrap captures, label-free: the mean over frames of ``proj``'s input and
output, and the model output (B, S, T) read as a channels-first sequence and pooled over time to
``--output-grid`` cells per speaker (``OCDConfig(output_layout="sequence_channels_first",
output_grid=...)``: S x grid values whatever the mixture's length).

Rows, per speaker count, mean ± sd over seeds, SI-SDRi (dB; SI-SDR of the matched estimates minus
SI-SDR of the mixture, against the sources) on the test mixtures (seen speakers) and on the
unseen-speaker test mixtures: base; base + compute-matched (trained further, Adam 1e-4, for OCD's
collection + fit wall time); OCD (1 draw); OCD(K); no scaling (global rho); the regression
generator; nearest neighbour (the stored delta of the training mixture whose mean log spectrum is
closest, L2); overfit on the test mixture (true sources; upper bound) and its delta truncated to
rank r (what a rank-r generator could hold at best); the paper's "alternative layer" ablation on
the layer ``select_layer`` ranks first (other than ``proj``): OCD (1 draw) and that layer's own
overfit bound. ``ocdwrap.headroom`` runs on ``--headroom-samples`` validation mixtures before
anything is collected (``--headroom-only`` stops there). The paper's Table 5 (Libri5Mix) stands
beside the 5-speaker table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

if __name__ == "__main__" and not __package__:  # run as a file: python benchmarks/speech.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import torch
from torch import nn

import ocdwrap
from ocdwrap.compare import Metric as CompareMetric
from ocdwrap.compare import Row as CompareRow
from ocdwrap.deltas import FullDelta
from ocdwrap.generators import GlobalScale

from . import cli, notes
from .controls import Agreement, rank_energy, truncate
from .datasets import tensor_loader
from .experiment import headroom_info, run_compare, table_rows
from .results import Metric, Results, Row, fmt_mean_sd
from .scoring import Task, evaluate_predictions, evaluate_with_deltas
from .speech_data import SAMPLE_RATE, EspeakMissingError, SpeechData, load_speech
from .speech_model import (
    Separator,
    count_parameters,
    mixture_sisdr,
    pit_neg_sisdr,
    pit_sisdr,
    train_separator,
)
from .timing import log, timed

MODULE = "benchmarks.speech"
LAYER = "proj"
# the library's default sampling steps, timed beside the rows'
LIBRARY_STEPS = ocdwrap.SamplingConfig().sampling_steps
# the paper's Table 5 (SI-SDRi, dB, Libri5Mix): base, OCD, overfit on the test mixture
PAPER = {"base": "12.7", "ocd": "13.4", "overfit": "13.5"}
METRICS = [
    Metric("sisdri", "SI-SDRi (dB)", ".2f"),
    Metric("sisdri_unseen", "SI-SDRi, unseen speakers (dB)", ".2f"),
]


class SpeechTask(Task):
    """Separation scored as SI-SDRi: the loss is the matched negative SI-SDR per mixture;
    ``mix_ref`` is the mean SI-SDR of the split's mixtures themselves (what SI-SDRi subtracts),
    ``key`` the metric name the rows are stored under."""

    def __init__(self, mix_ref: float, key: str = "sisdri") -> None:
        super().__init__("regression", pit_neg_sisdr)
        self.mix_ref, self.key = mix_ref, key

    def metrics(self, res: dict[str, Any]) -> dict[str, float]:
        return {self.key: -float(res["loss"]) - self.mix_ref}


def evaluate_plain(
    model: nn.Module, loader: Any, task: SpeechTask, device: str
) -> dict[str, float]:
    """A plain separator's metrics (eval mode). Not ``scoring.evaluate_module``: its regression
    path also takes the square root of the mean loss, and a negative SI-SDR loss has none."""
    model.eval()
    return evaluate_predictions(lambda x, y: model(x), loader, task, device)


def log_spectrum(x: torch.Tensor, n_fft: int = 256) -> torch.Tensor:
    """(B, T) -> (B, n_fft // 2 + 1): the mean log magnitude of each frequency bin over time
    (the nearest neighbour's feature: raw waveforms are not comparable by L2)."""
    win = torch.hann_window(n_fft, device=x.device)
    spec = torch.stft(x, n_fft, n_fft // 2, window=win, return_complex=True).abs()
    return torch.log(spec + 1e-5).mean(-1)


def rows_for(n_speakers: int, rank: int, lr: float, steps: int) -> list[Row]:
    """The table's rows; the paper's Table 5 beside the 5-speaker table (Libri5Mix)."""
    paper = {k: {"sisdri": v} for k, v in PAPER.items()} if n_speakers == 5 else {}
    return table_rows(
        [
            "base", "compute_matched", "ocd", "ocd_k",
            Row("ocd_k_aligned", "OCD(5), each draw's speakers put in the base's order first"),
            "global", "regression", "nearest", "probe",
            Row("overfit_rank", f"overfit proj on test, delta truncated to rank {rank}"),
            "overfit",
            Row("alt", f"alternative layer (select_layer's first), OCD 1 draw (low-rank, r = {rank})"),
            Row("alt_overfit", "alternative layer, overfit on test (its upper bound)"),
        ],
        layer=LAYER,
        space="mean log spectrum",
        labels={
            "base": "base MulCat separator",
            "ocd": f"OCD, 1 draw (low-rank, r = {rank})",
            "ocd_k": "OCD(5) ensemble (mean waveform)",
            "overfit": f"overfit proj on test (Adam {lr:g} × {steps}; upper bound)",
            "probe": "overfit proj on test towards a probe's prediction (no test sources)",
        },
        paper=paper,
    )  # fmt: skip


SPLITS = (("test", "sisdri"), ("test_unseen", "sisdri_unseen"))


def sisdri_metrics(splits: dict) -> tuple[dict[str, CompareMetric], Any]:
    """SI-SDRi of each test split through ``ocdwrap.compare``'s ``metrics=``. compare scores
    one eval set, the seen-speaker test mixtures followed by the unseen-speaker ones; each
    split's SI-SDRi is a per-sample Metric over all of them that is the split's SI-SDRi
    (minus the matched loss, minus the split's mixture SI-SDR) weighted N / n on the split's
    own n mixtures and 0 on the others, so that its mean over the N is the split's mean. Also
    the function that turns a compare row into this table's metrics."""
    sizes = [len(splits[split][0]) for split, _ in SPLITS]
    total, out, lo = sum(sizes), {}, 0
    for (split, key), n in zip(SPLITS, sizes):
        ref = float(mixture_sisdr(splits[split][1]).mean())
        weight = torch.zeros(total, dtype=torch.float64)
        weight[lo : lo + n] = total / n
        lo += n

        def fn(pred: torch.Tensor, target: torch.Tensor, ref=ref, weight=weight) -> torch.Tensor:
            return (-pit_neg_sisdr(pred, target).double().cpu() - ref) * weight

        out[key] = CompareMetric(fn, higher_is_better=True)

    def to_metrics(row: CompareRow) -> dict[str, float]:
        return {key: row.metrics[key] for _, key in SPLITS}

    return out, to_metrics


def both_splits(splits: dict, batch: int) -> Any:
    """compare's eval data: the seen-speaker test mixtures, then the unseen-speaker ones."""
    mix = torch.cat([splits[s][0] for s, _ in SPLITS])
    src = torch.cat([splits[s][1] for s, _ in SPLITS])
    return tensor_loader(mix, src, batch)


def speech_settings(
    args: Any, seed: int
) -> tuple[ocdwrap.OCDConfig, ocdwrap.FitArgs, ocdwrap.SamplingConfig]:
    """The OCDConfig, FitArgs (minibatch ``--fit-batch`` but with ``--paper``) and
    SamplingConfig of one seed."""
    kw: dict[str, Any] = {"overfit_steps": args.overfit_steps, "delta_rank": args.delta_rank}
    kw["output_layout"], kw["output_grid"] = "sequence_channels_first", args.output_grid
    cfg, fit = cli.ocd_config(args, **kw), cli.fit_args(args, seed)
    fit = fit if args.paper else fit.replace(batch_size=args.fit_batch)
    return cfg, fit, cli.sampling_config(args, seed, task="regression")


# --- one seed, one speaker count ---------------------------------------------------------------
def split_tensors(
    data: SpeechData, S: int, args: Any
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for split, n in (
        ("train", None),
        ("val", None),
        ("test", args.test),
        ("test_unseen", args.test),
    ):
        mix, src = data.mixtures(split, S)
        out[split] = (mix[:n].to(args.device), src[:n].to(args.device))
    return out


def collected(splits: dict, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The training mixtures and sources OCD learns from (the first ``--collect``): collection,
    the alternative layer's collection and the headroom probe all use these."""
    return tuple(t[: args.collect] for t in splits["train"])  # type: ignore[return-value]


def ocd_rows(
    args: Any, seed: int, S: int, base: Separator, splits: dict, out_dir: str
) -> tuple[dict[str, dict[str, float]], dict[str, Any], dict[str, torch.Tensor]]:
    """The shared rows through ``ocdwrap.compare`` on both test splits at once (nearest by the
    mean log spectrum, SI-SDRi of each split as metrics, the compute-matched base trained
    further with the separator's own training), and with its fitted generator the rows only
    this table has: OCD(K) with each draw aligned to the base's speaker order, and the
    overfit delta truncated to rank r. Returns (row -> metrics), the info, and the waveforms
    of test mixture 0 for the figure."""
    cfg, fit, sampling = speech_settings(args, seed)
    tasks = {s: SpeechTask(float(mixture_sisdr(splits[s][1]).mean()), k) for s, k in SPLITS}
    loaders = {s: tensor_loader(*splits[s], args.batch) for s, _ in SPLITS}
    metrics, to_metrics = sisdri_metrics(splits)
    record: dict[str, Any] = {}

    def train_more(model: nn.Module, seconds: float) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        record.update(
            train_separator(
                model, splits["train"], splits["val"], seconds=seconds, patience=args.patience,
                batch_size=args.batch, lr=1e-4, seed=seed + 1000,
            )
        )  # fmt: skip
        return model

    extra: dict[str, Any] = {"agreement": {}}
    waves: dict[str, torch.Tensor] = {}
    tag = f"[{S} spk {LAYER}] "

    def split_rows(model: ocdwrap.OCDModel, split: str, rows: dict) -> None:
        task, loader, n = tasks[split], loaders[split], len(splits[split][0])
        log(f"{tag}overfitting {LAYER} on each of the {n} {split} mixtures")
        agree, extra[f"overfit_{split}_s"] = timed(lambda: Agreement(model, loader, task, n))
        true = {it[5]: it[3].reshape(-1, *model.weight_shape) for it in agree.items}
        rng = torch.Generator(device=model.device).manual_seed(seed)
        cos = agree.score(lambda x, y, c, p: model.generate(c, rng=rng))
        if split == "test":
            extra["true_delta_rank_energy"] = rank_energy(torch.cat(list(true.values())))
            extra["agreement"]["ocd"] = cos
            waves.update(first_mixture_waves(model, splits["test"], true[0][:1], seed))
        else:
            extra["unseen"] = {"agreement": {"ocd": cos}}
        rows["ocd_k_aligned"].update(aligned_ensemble(model, loader, task, args.draws, seed))
        rows["overfit_rank"].update(
            evaluate_with_deltas(
                model, loader, task, lambda x, y, p: FullDelta(truncate(true[p], args.delta_rank))
            )
        )

    def after(model: ocdwrap.OCDModel, rows: dict) -> None:
        extra["inference_s_per_mixture"] = inference_times(
            model, splits["test"][0], args.batch, seed, (sampling.sampling_steps, LIBRARY_STEPS)
        )
        log(f"{tag}time per mixture: {extra['inference_s_per_mixture']}")
        rows["ocd_k_aligned"], rows["overfit_rank"] = {}, {}
        for split, _ in SPLITS:
            split_rows(model, split, rows)
        log(f"{tag}OCD({args.draws}) aligned: {rows['ocd_k_aligned']}; "
            f"rank {args.delta_rank}: {rows['overfit_rank']}")  # fmt: skip

    run = run_compare(
        base, LAYER, cfg, tensor_loader(*collected(splits, args), args.batch),
        both_splits(splits, args.batch), tasks["test"], out_dir, fit_args=fit, sampling=sampling,
        draws=args.draws, seed=seed, train_fn=train_more, train_record=record,
        features=log_spectrum, metrics=metrics, to_metrics=to_metrics,
        generators={"global": GlobalScale()}, progress=args.progress, tag=f"{S} spk {LAYER}",
        agreement_samples=0, after=after,
    )  # fmt: skip
    run.info.update(extra)
    return run.rows, run.info, waves


def alt_rows(
    args: Any,
    seed: int,
    S: int,
    base: Separator,
    layer: str,
    splits: dict,
    info: dict,
    out_dir: str,
) -> dict[str, dict[str, float]]:
    """The paper's "alternative layer" ablation with select_layer's ranking: compare's ocd row
    (1 draw) on the layer ranked first (the next one if that is ``proj``), collected and fitted
    as ``proj`` is, and its overfit row (that layer's own upper bound), on both test splits.
    ``info["alt"]`` gets the layer and the comparison's info."""
    cfg, fit, sampling = speech_settings(args, seed)
    metrics, to_metrics = sisdri_metrics(splits)
    shape: list[int] = []
    run = run_compare(
        base, layer, cfg, tensor_loader(*collected(splits, args), args.batch),
        both_splits(splits, args.batch), SpeechTask(0.0), out_dir, fit_args=fit,
        sampling=sampling, rows=("ocd",), seed=seed, metrics=metrics, to_metrics=to_metrics,
        progress=args.progress, tag=f"{S} spk {layer}", agreement_samples=0,
        after=lambda model, rows: shape.extend(model.weight_shape),
    )  # fmt: skip
    info["alt"] = {**run.info, "weight_shape": shape}
    log(
        f"[{S} spk {layer}] OCD (1 draw): {run.rows['ocd']}; overfit on test: {run.rows['overfit']}"
    )
    return {"alt": run.rows["ocd"], "alt_overfit": run.rows["overfit"]}


def aligned_ensemble(
    model: ocdwrap.OCDModel, loader: Any, task: SpeechTask, draws: int, seed: int
) -> dict[str, float]:
    """OCD(K) for outputs with a permutation inside: each draw's estimated speakers are first put
    in the order of the base model's estimates (the assignment that maximises SI-SDR against the
    base's output; no label used), then the K draws are averaged: ``OCDModel.ensemble``'s
    ``align`` hook. Without it the draws are averaged as they come, which mixes speakers
    whenever two draws order them differently."""
    gen = torch.Generator(device=model.device).manual_seed(seed)

    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with model.disable_adapter():
            base = model(x)
        ens = model.ensemble(x, num_draws=draws, rng=gen, align=lambda d: to_order_of(d, base))
        return ens.mean

    return evaluate_predictions(predict, loader, task, str(model.device))


def to_order_of(draws: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Draws (K, B, S, T) with each draw's speakers put in the order of ``reference`` (B, S, T):
    the assignment that maximises SI-SDR against it."""
    aligned = []
    for est in draws:
        _, perm = pit_sisdr(est, reference)  # perm[b, s] = the estimate matched to speaker s
        aligned.append(torch.gather(est, 1, perm[..., None].expand_as(est)))
    return torch.stack(aligned)


@torch.no_grad()
def inference_times(
    model: ocdwrap.OCDModel,
    mixtures: torch.Tensor,
    batch: int,
    seed: int,
    steps: tuple[int, ...],
) -> dict[str, Any]:
    """Seconds per mixture of the base separator and of OCD (one draw: generation + the
    separator with the generated weights) with each number of sampling steps in ``steps``,
    over the test mixtures in batches of ``batch``; the base is timed before and after the OCD
    passes and its faster time kept (the machine is shared). ``ocd``/``ratio`` are for
    ``steps[0]`` (the rows' setting), ``by_steps`` has them all."""

    def run() -> None:
        for i in range(0, len(mixtures), batch):
            model(mixtures[i : i + batch])

    with model.disable_adapter():
        _, base_s = timed(run)
    by_steps = {}
    for k in dict.fromkeys(steps):
        with model.sampling(seed=seed, sampling_steps=k):
            by_steps[k] = timed(run)[1]
    with model.disable_adapter():
        base_s = min(base_s, timed(run)[1])
    n = len(mixtures)
    out: dict[str, Any] = {"base": base_s / n}
    out["by_steps"] = {
        str(k): {"ocd": s / n, "ratio": s / max(base_s, 1e-9)} for k, s in by_steps.items()
    }
    out.update(out["by_steps"][str(steps[0])])
    return out


@torch.no_grad()
def first_mixture_waves(
    model: ocdwrap.OCDModel, test: tuple, true_delta: torch.Tensor, seed: int
) -> dict[str, torch.Tensor]:
    """Test mixture 0: the mixture, its sources, and the base's, OCD's and the overfit's
    estimates, each put in the sources' order (best assignment)."""
    mix, src = test[0][:1], test[1][:1]
    with model.disable_adapter():
        base = model(mix)
    with model.sampling(seed=seed):
        ocd = model(mix)
    with model.use_deltas(FullDelta(true_delta.to(model.device))):
        over = model(mix)
    out = {"mixture": mix[0], "sources": src[0]}
    for name, est in (("base", base), ("OCD", ocd), ("overfit", over)):
        _, perm = pit_sisdr(est, src)  # perm[t] = the estimate matched to source t
        out[name] = est[0][perm[0]]
    return {k: v.detach().float().cpu() for k, v in out.items()}


def select_layer_info(base: Separator, val: tuple, args: Any, seed: int) -> dict[str, Any]:
    """``ocdwrap.select_layer``'s ranking of the separator's Linear layers (a few validation
    mixtures, 8 perturbation draws): what it ranks first, and where ``proj`` stands."""
    loader = tensor_loader(val[0][: args.select_samples], val[1][: args.select_samples], args.batch)
    scores, seconds = timed(
        lambda: ocdwrap.select_layer(
            base, loader, pit_neg_sisdr, draws=args.select_draws,
            max_samples=args.select_samples, seed=seed, device=args.device, progress=False,
            vectorize=False,
        )
    )  # fmt: skip
    names = [n for n, _ in scores.ranking]
    return {
        "best": scores.best,
        "proj_rank": names.index(LAYER) + 1 if LAYER in names else None,
        "candidates": len(names),
        "ranking": scores.to_list(),
        "seconds": seconds,
        "samples": args.select_samples,
        "draws": args.select_draws,
    }


def run_seed(args: Any, seed: int, S: int, data: SpeechData, res: Results, workdir: str) -> dict:
    """Every row of one speaker count and seed; returns the waveforms of test mixture 0."""
    info: dict[str, Any] = {}
    res.info[seed] = info
    splits = split_tensors(data, S, args)
    torch.manual_seed(seed)
    base = Separator(S, **model_kwargs(args)).to(args.device)
    info["model"] = {"parameters": count_parameters(base), "proj": list(base.proj.weight.shape),
                     "receptive_window_samples": base.receptive_window, **model_kwargs(args)}  # fmt: skip
    log(f"{S} speakers, seed {seed}: training the separator ({info['model']['parameters']:,} "
        f"parameters) for at most {args.train_seconds:g} s")  # fmt: skip
    info["base_training"] = train_separator(
        base, splits["train"], splits["val"], seconds=args.train_seconds, patience=args.patience,
        batch_size=args.batch, seed=seed, log=log, filterbank_steps=args.filterbank_steps,
        max_steps=args.train_steps,
    )  # fmt: skip
    rows: dict[str, dict[str, float]] = {"base": {}}
    for split, key in (("test", "sisdri"), ("test_unseen", "sisdri_unseen")):
        task = SpeechTask(float(mixture_sisdr(splits[split][1]).mean()), key)
        info[f"mixture_sisdr_{split}"] = task.mix_ref
        loader = tensor_loader(*splits[split], args.batch)
        rows["base"].update(evaluate_plain(base, loader, task, args.device))
    log(f"  base: {rows['base']}")
    if args.select_samples:
        info["selection"] = select_layer_info(base, splits["val"], args, seed)
        log(f"  select_layer: best {info['selection']['best']}, {LAYER} ranked "
            f"{info['selection']['proj_rank']} of {info['selection']['candidates']}")  # fmt: skip
    val_task = SpeechTask(float(mixture_sisdr(splits["val"][1]).mean()))
    headroom_info(
        res, seed, base, LAYER, speech_settings(args, seed)[0], tensor_loader(*splits["val"], args.batch),
        val_task, max_samples=args.headroom_samples,
        train_loader=tensor_loader(*collected(splits, args), args.batch),
        max_train_samples=None,
    )  # fmt: skip
    if args.headroom_only:
        return {}
    out_dir = os.path.join(workdir, f"{S}spk-s{seed}")
    ocd, info["ocd"], waves = ocd_rows(args, seed, S, base, splits, out_dir)
    rows.update(ocd)
    if "selection" in info:
        alt = next(n for n, _ in info["selection"]["ranking"] if n != LAYER)
        rows.update(alt_rows(args, seed, S, base, alt, splits, info, out_dir + "-alt"))
    if "compute_matched" in info["ocd"]:
        info["compute_matched"] = info["ocd"]["compute_matched"]
    for key in res.keys:
        if key in rows:
            res.add(seed, key, rows[key])
    return waves


def model_kwargs(args: Any) -> dict[str, int]:
    return {k: getattr(args, k) for k in ("channels", "hidden", "kernel", "chunk", "blocks")}


# --- notes, figure ---------------------------------------------------------------------------
def table_notes(res: Results, args: Any, S: int, data: SpeechData) -> list[str]:
    p = PAPER if S == 5 else None
    paper_gap = (
        (float(p["base"]) - float(p["ocd"])) / (float(p["base"]) - float(p["overfit"]))
        if p
        else None
    )
    out = notes.gap_notes(res, "sisdri", {"ocd": paper_gap, "ocd_k": None})
    out += notes.other_gaps_note(
        res,
        "sisdri",
        ("compute_matched", "global", "regression", "nearest", "probe", "overfit_rank"),
    )
    out += notes.compare_note(res)
    out += notes.headroom_note(res)
    infos = list(res.info.values())
    bt = [i["base_training"] for i in infos if "base_training" in i]
    if bt:
        m = infos[0]["model"]
        out.append(
            f"base: MulCat separator, {m['parameters']:,} parameters (N = {m['channels']}, LSTM "
            f"{m['hidden']} per direction, encoder {m['kernel']} samples, chunks of {m['chunk']} frames, "
            f"{m['blocks']} dual-path blocks), encoder/decoder first trained alone to reconstruct "
            f"the mixtures ({args.filterbank_steps} steps, Adam 2e-3; reconstruction SI-SDR "
            f"{[round(b['filterbank_sisdr'], 1) for b in bt if b['filterbank_sisdr'] is not None]} dB), "
            f"then Adam 1e-3, batch {args.batch}, at most "
            + (
                f"{a} steps"
                if (a := getattr(args, "train_steps", None))
                else f"{args.train_seconds:g} s"
            )
            + ", early stopping on the validation mixtures (patience "
            f"{args.patience}): epochs {[b['epochs_run'] for b in bt]}, best epoch "
            f"{[b['best_epoch'] for b in bt]}, stopped early {[b['stopped_early'] for b in bt]}, "
            f"{[round(b['seconds']) for b in bt]} s, best validation SI-SDRi "
            f"{[round(b['best_val_sisdri'], 2) for b in bt]} dB"
        )
    cm = [i["compute_matched"] for i in infos if "compute_matched" in i]
    if cm:
        out.append(
            "compute-matched: the base trained further (fresh Adam 1e-4, same loss) for "
            f"{[round(c['budget_s']) for c in cm]} s (= OCD collection + fit wall time), "
            f"{[c['steps'] for c in cm]} steps"
        )
    out += notes.ocd_note(res)
    out += notes.agreement_note(res)
    ocd = [i["ocd"] for i in infos if "ocd" in i]
    if ocd:
        energy = [o["true_delta_rank_energy"] for o in ocd]
        out.append(
            f"overfit-on-test deltas of {LAYER} are not rank one: share of their squared norm in the "
            "top r singular values, r = "
            + ", ".join(
                f"{r}: {fmt_mean_sd([100 * e[r] for e in energy], '.1f')} %" for r in energy[0]
            )
        )
        t = [o["inference_s_per_mixture"] for o in ocd]
        by = [x.get("by_steps", {str(args.sampling_steps): x}) for x in t]
        out.append(
            f"inference per test mixture (batches of {args.batch}): base "
            f"{[round(1000 * x['base'], 1) for x in t]} ms; OCD 1 draw (generation + separator) "
            + "; ".join(
                f"{k} sampling steps {[round(1000 * b[k]['ocd'], 1) for b in by if k in b]} ms, "
                f"ratio {[round(b[k]['ratio'], 2) for b in by if k in b]}"
                for k in by[0]
            )
        )
    alt = [i["alt"] for i in infos if "alt" in i]
    if alt:
        vals = res.gap("alt", "base", "alt_overfit", "sisdri")
        out.append(
            "alternative layer, OCD 1 draw: captures "
            f"{fmt_mean_sd([100 * v for v in vals], '.1f')} % of the base → its own "
            "overfit-on-test gap in sisdri; negative means worse than the base"
        )
        out.append(
            f"alternative layer: {[a['layer'] for a in alt]} (select_layer's first choice other "
            f"than {LAYER}; Linear {alt[0]['weight_shape'][0]} × {alt[0]['weight_shape'][1]}, "
            "its input every chunk's frames of a mixture; the same low-rank OCD, collection and "
            f"fit): collect {[round(a['collect_s'], 1) for a in alt]} s, fit "
            f"{[round(a['fit_s']) for a in alt]} s"
        )
    sel = [i["selection"] for i in infos if "selection" in i]
    if sel:
        out.append(
            f"select_layer (Linear layers, {sel[0]['draws']} gaussian draws, {sel[0]['samples']} "
            f"validation mixtures, {[round(s['seconds']) for s in sel]} s): ranks "
            f"{[s['best'] for s in sel]} first; {LAYER} ranked {[s['proj_rank'] for s in sel]} of "
            f"{sel[0]['candidates']}"
        )
    mix = [
        (i["mixture_sisdr_test"], i["mixture_sisdr_test_unseen"])
        for i in infos
        if "mixture_sisdr_test" in i
    ]
    if mix:
        out.append(
            "SI-SDR of the mixtures themselves (what SI-SDRi subtracts), test / unseen: "
            f"{[tuple(round(v, 2) for v in m) for m in mix]} dB"
        )
    s = data.summary()
    out.append(
        f"data: espeak-ng speech (benchmarks.speech_data, not LibriSpeech), {s['speakers']['train']} "
        f"training speakers, {s['speakers']['test_unseen']} unseen ones, 8 kHz, "
        f"{s['seconds_per_mixture']:g} s mixtures of {S} speakers: {s['mixtures'][f'train/{S}']} "
        f"training ({args.collect} of them collected), {s['mixtures'][f'val/{S}']} validation, "
        f"{min(args.test, s['mixtures'][f'test/{S}'])} test and as many unseen-speaker test "
        f"mixtures; {s['file_mb']:.1f} MB, synthesised in {s['generation_s']:.0f} s"
        + (" (read from the cache)" if s["cached"] else "")
    )
    out.append(
        f"settings: OCD on {LAYER} (Linear {S * args.channels} × {args.channels} on every frame), "
        f"delta=lowrank (rank {args.delta_rank}), overfit Adam {args.overfit_lr:g} × "
        f"{args.overfit_steps} on the matched negative SI-SDR, {args.fit_steps} fit steps, "
        f"K={args.draws}; conditioning: {LAYER}'s input and output averaged over frames and the "
        f"separated waveforms pooled to {args.output_grid} time cells per speaker "
        f"(OCDConfig(output_layout='sequence_channels_first', output_grid={args.output_grid})); "
        "paper: Table 5, Libri5Mix, its full-size Gated-LSTM network"
    )
    return out


def plot_spectrograms(waves: dict[str, torch.Tensor], path: str, title: str) -> str:
    """Spectrograms of test mixture 0, its sources, and the base's, OCD's and the overfit's
    estimates (one column per speaker, matched to the sources)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    S = waves["sources"].shape[0]
    names = ["sources", "base", "OCD", "overfit"]
    fig, axes = plt.subplots(
        len(names) + 1, S, figsize=(2.6 * S, 1.6 * (len(names) + 1)), squeeze=False
    )

    def show(ax: Any, x: torch.Tensor, label: str) -> None:
        floor = 1e-6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
        ax.specgram((x + floor).numpy(), NFFT=256, Fs=SAMPLE_RATE, noverlap=192, cmap="magma")
        ax.set_title(label, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])

    show(axes[0, 0], waves["mixture"], "mixture")
    for ax in axes[0, 1:]:
        ax.axis("off")
    for r, name in enumerate(names, start=1):
        for s in range(S):
            x = waves[name][s]
            label = f"{name}, speaker {s + 1}"
            if name != "sources":
                db = float(pit_sisdr(x[None, None], waves["sources"][s][None, None])[0])
                label += f" (SI-SDR {db:.1f} dB)"
            show(axes[r, s], x, label)
    fig.suptitle(title.replace(": ", ":\n", 1), fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> Any:
    p = cli.base_parser(MODULE, __doc__, seeds=(0,))
    for action in p._actions:  # proj sees every frame of a mixture: no rank one
        if action.dest == "delta":
            action.choices, action.help = ["lowrank"], "lowrank (the only choice here)"
    p.set_defaults(overfit_lr=1e-3)
    p.add_argument("--speakers", type=int, nargs="+", choices=[2, 5], default=[2])
    p.add_argument("--delta-rank", type=int, default=4, help="rank r of the low-rank deltas")
    p.add_argument("--overfit-steps", type=int, default=10, help="Adam steps of each overfit")
    p.add_argument("--train-seconds", type=float, default=480, help="base training budget (s)")
    p.add_argument(
        "--train-steps", type=int, default=None,
        help="base training budget in optimizer steps instead of --train-seconds (the same base "
        "whatever the load; a committed run's base is reproduced with its recorded steps)",
    )  # fmt: skip
    p.add_argument(
        "--filterbank-steps", type=int, default=500,
        help="steps of encoder/decoder pre-training (reconstruction) inside the budget",
    )  # fmt: skip
    p.add_argument("--patience", type=int, default=3, help="early-stopping patience (epochs)")
    p.add_argument("--batch", type=int, default=8, help="mixtures per batch (train, collect, eval)")
    p.add_argument("--collect", type=int, default=500, help="training mixtures collected")
    p.add_argument("--test", type=int, default=200, help="test mixtures per test split")
    p.add_argument("--train-mixtures", type=int, default=2000, help="training mixtures")
    p.add_argument("--channels", type=int, default=32, help="separator width N")
    p.add_argument("--hidden", type=int, default=32, help="LSTM units per direction")
    p.add_argument("--kernel", type=int, default=32, help="encoder window (samples)")
    p.add_argument("--chunk", type=int, default=32, help="frames per chunk")
    p.add_argument("--blocks", type=int, default=2, help="dual-path blocks")
    p.add_argument("--fit-batch", type=int, default=128, help="fit() batch size")
    p.add_argument(
        "--output-grid", type=int, default=8,
        help="the separated waveforms pooled to this many time cells per speaker "
        "(OCDConfig.output_grid, output_layout='sequence_channels_first')",
    )  # fmt: skip
    p.add_argument("--select-samples", type=int, default=16, help="select_layer mixtures (0: skip)")
    p.add_argument("--select-draws", type=int, default=8, help="select_layer draws per layer")
    p.set_defaults(headroom_samples=64)  # each mixture is overfitted 10 times (probe mixture: 8)
    p.add_argument("--cache-dir", default=None, help="data cache (default ~/.cache/ocdwrap/speech)")
    cli.add_merge_option(p, "speaker counts")
    args = p.parse_args(argv)
    if cli.merge_requested(p, args):
        return args
    args.data = None
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.train_seconds, args.patience, args.collect, args.test = 4, 1, 12, 4
        args.filterbank_steps = 20
        args.channels, args.hidden, args.fit_batch = 16, 16, 8
        args.fit_steps, args.draws, args.select_samples, args.select_draws = (
            args.fit_steps or 10,
            2,
            4,
            3,
        )
        args.headroom_samples = 4
        args.data = dict(
            utterances={"train": 24, "val": 8, "test": 8, "test_unseen": 8},
            mixtures={"train": 16, "val": 4, "test": 4, "test_unseen": 4},
            n_seen=8, n_unseen=5, seconds=0.5,
        )  # fmt: skip
    args.fit_steps = args.fit_steps or (20000 if args.paper else 2000)
    args.delta = "lowrank"
    if args.delta_rank < 1:
        p.error(f"--delta-rank must be >= 1, got {args.delta_rank}")
    if args.output_grid < 1:
        p.error(f"--output-grid must be >= 1, got {args.output_grid}")
    return args


def load_data(args: Any) -> SpeechData:
    """The mixtures (synthesised once, then read from the cache); a missing espeak-ng is a
    one-line error naming the fix."""
    kw = args.data or {
        "mixtures": {"train": args.train_mixtures, "val": 200, "test": 200, "test_unseen": 200}
    }
    try:
        data, seconds = timed(lambda: load_speech(directory=args.cache_dir, **kw))
    except EspeakMissingError as e:  # a clear message, not a traceback
        raise SystemExit(f"error: {e}") from None
    log(f"speech data: {'read from the cache' if data.cached else 'synthesised'} ({data.path}), "
        f"{seconds:.1f} s, {data.nbytes / 2**20:.1f} MB")  # fmt: skip
    return data


def make_part(args: Any, S: int, data: SpeechData, workdir: str | None) -> cli.Part:
    """The table of ``S``-speaker mixtures."""
    res = Results(
        f"speech-{S}spk", rows_for(S, args.delta_rank, args.overfit_lr, args.overfit_steps), METRICS
    )
    title = f"Speech separation, {S} speakers (espeak-ng stand-in), OCD on {LAYER}"
    return cli.Part(
        f"{S}spk", res, title,
        run_seed=lambda seed: run_seed(args, seed, S, data, res, workdir),
        notes=lambda: table_notes(res, args, S, data),
        figure=lambda seed, waves: plot_spectrograms(
            waves, os.path.join(args.plots, f"speech-{S}spk-spectrograms.png"),
            f"{title}: test mixture 0, seed {seed}",
        ),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cmd = cli.command(MODULE, argv)
    if args.merge:
        merged = cli.merge_runs(
            args.merge, cmd, benchmark="speech", parts_setting="speakers",
            part_value=lambda name: int(name.removesuffix("spk")),
            make_part=lambda a, name: make_part(a, int(name.removesuffix("spk")), load_data(a), None),
        )  # fmt: skip
        merged["data"] = load_data(argparse.Namespace(**merged["settings"])).summary()
        return cli.merge_main(args, merged)
    workdir = cli.setup(args)
    t0 = time.perf_counter()
    data = load_data(args)
    return cli.run_parts(
        args, (make_part(args, S, data, workdir) for S in args.speakers), benchmark="speech",
        module=MODULE, argv=argv, t0=t0, head={"data": data.summary()},
    )  # fmt: skip


if __name__ == "__main__":
    main()
