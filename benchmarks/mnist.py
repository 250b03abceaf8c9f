"""MNIST / LeNet5: the paper's Table 1 (test cross-entropy and accuracy), every ablation.

    python -m benchmarks.mnist --json runs/mnist.json            # CPU default, 3 seeds
    python -m benchmarks.mnist --paper --json runs/mnist_paper.json   # paper sizes, for a GPU
    python -m benchmarks.mnist --smoke                            # seconds; checks the plumbing

Per seed: LeNet5 trained on the 50k MNIST training images to convergence (Adam 1e-3, early
stopping on the 10k validation images, patience 3, best weights kept); OCD on ``fc2`` (120 -> 84,
the paper's layer), the first ``--train-samples`` training images overfitted (Adam 5e-4 x 3 steps,
the released code), the hypernetwork fitted, then on the 10k test images:

* base; base + compute-matched training (the base trained further, Adam 1e-4, for the wall time
  that OCD's collection and fitting took);
* OCD (1 draw); OCD(K); no scaling (the training set's mean rho); the regression generator
  (no diffusion); nearest neighbour (the stored delta of the training image closest in pixel
  space); alternative layer (the top-ranked other Linear layer by ``select_layer``);
* OCD with the paper text's optimizer (SGD, 3 steps, its lr chosen so the mean delta size rho
  equals Adam's on 1,024 training images), with learned and with global rho;
* overfit on test (true labels; fc2; Adam 5e-4 x 3 = the collection's setting, and 2e-3 x 3),
  SGD overfit on test, and every layer overfitted on each test image (Adam 5e-4 x 3).

CPU default: rank-one deltas (``OCDConfig(delta="rank1")``), 20k overfitted images, 3,000 fit
steps, 3 seeds. ``--paper``: all 50k images, the paper's full-matrix UNet, 20k fit steps.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

import ocdwrap
from ocdwrap.generators import GlobalScale

from . import cli, notes
from .datasets import load_mnist, tensor_loader
from .experiment import (
    COMPARE_ROWS,
    add_run,
    alternative_layer_row,
    base_row,
    headroom_info,
    overfit_all_row,
    pixels,
    run_compare,
    table_rows,
    train_fn_for,
)
from .results import Metric, Results, Row, fmt_mean_sd, with_overfit_lr
from .scoring import Task, evaluate_ocd
from .timing import log
from .zoo import LeNet5

MODULE = "benchmarks.mnist"

LAYER = "fc2"
STRONG_LR = 2e-3

ROWS = table_rows(
    [
        "base", "compute_matched", "ocd", "ocd_k", "global", "regression", "nearest", "own_label",
        "probe", Row("alt", "alternative layer (see notes), 1 draw", {"loss": "0.078", "acc": "99.2"}),
        Row("sgd_ocd", "OCD, 1 draw, SGD overfit (paper text)"),
        Row("sgd_global", "OCD, SGD overfit, global ρ"),
        "overfit",
        Row("overfit_strong", f"overfit fc2 on test (Adam {STRONG_LR:g} × 3)"),
        Row("sgd_overfit", "overfit fc2 on test (SGD, matched lr × 3)"),
        Row("overfit_all", "overfit ALL layers on test (Adam 5e-4 × 3)"),
        Row("seen_base", "base on 10k training images not collected (authors' first protocol)"),
        Row("seen_ocd", "OCD, 1 draw, on those training images"),
        Row("seen_overfit", "overfit fc2 on those training images (upper bound)"),
    ],
    layer=LAYER,
    space="pixel space",
    labels={
        "base": "base LeNet5 (early stopping on val split)",
        "ocd": "OCD, 1 draw (Adam overfit)",
    },
    paper={
        "base": {"loss": "0.080 ± 0.009", "acc": "99.2 ± 0.1"},
        "ocd": {"loss": "0.010 ± 0.006", "acc": "99.7 ± 0.1"},
        "global": {"loss": "0.069", "acc": "99.3"},
        "nearest": {"loss": "0.073", "acc": "99.3"},
        "overfit": {"loss": "0.002", "acc": "100"},
    },
)  # fmt: skip
METRICS = [Metric("loss", "test CE", ".4f"), Metric("acc", "test acc %", ".2f")]
PAPER_GAP = {"ocd": (0.080 - 0.010) / (0.080 - 0.002), "ocd_k": None}
PAPER_GAP_ACC = {"ocd": (99.7 - 99.2) / (100 - 99.2), "ocd_k": None}


def parse_args(argv: list[str] | None) -> Any:
    p = cli.base_parser(MODULE, __doc__)
    p.add_argument("--train-samples", type=int, default=20000, help="training images overfitted")
    p.add_argument("--max-epochs", type=int, default=30, help="base training epochs at most")
    p.add_argument(
        "--test-samples", type=int, default=None, help="first N test images (default all)"
    )
    p.add_argument(
        "--seen-samples",
        type=int,
        default=10000,
        help="training images after the collected ones scored as a 'test set' (seen_* rows)",
    )
    p.add_argument(
        "--ocd-only",
        action="store_true",
        help="only the base and the fc2 / Adam OCD rows (for sweeps, e.g. of --fit-steps)",
    )
    p.add_argument(
        "--all-layers-samples",
        type=int,
        default=None,
        help="test images for the all-layers row (default all)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.train_samples, args.max_epochs, args.test_samples = 300, 1, 500
        args.all_layers_samples = 100
        args.seen_samples = 200
        args.fit_steps = args.fit_steps or 20
        args.draws = 2
    if args.paper:
        args.train_samples = 50000
    return cli.resolve_defaults(args)


def calibrate_sgd_lr(
    base: nn.Module, cfg: ocdwrap.OCDConfig, x: torch.Tensor, y: torch.Tensor, task: Task
) -> dict:
    """SGD lr whose mean delta std (rho) equals Adam's on the same images (two secant steps)."""
    model = ocdwrap.wrap(base, layer=LAYER, config=cfg)
    try:

        def mean_rho(c: ocdwrap.OCDConfig) -> float:
            res = ocdwrap.overfit_batch(model, x, y, task.loss_fn, config=c)
            return float(res.delta.reshape(len(x), -1).std(1, unbiased=False).mean())

        target = mean_rho(cfg)
        lr = 0.1
        for _ in range(3):
            lr *= target / mean_rho(cfg.replace(overfit_optimizer="sgd", overfit_lr=lr))
        achieved = mean_rho(cfg.replace(overfit_optimizer="sgd", overfit_lr=lr))
    finally:
        model.unload()
    return {"lr": lr, "adam_rho_mean": target, "sgd_rho_mean": achieved, "samples": len(x)}


def run_seed(args: Any, seed: int, data: dict, res: Results, workdir: str) -> None:
    dev = args.device
    task = Task.classification()
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    test = tensor_loader(xte, yte, 1000)
    info: dict[str, Any] = {}
    res.info[seed] = info

    log(f"seed {seed}: training LeNet5 on {len(xtr)} images to convergence")
    torch.manual_seed(seed)
    base = LeNet5()
    pristine = base_row(
        res, seed, base, (xtr, ytr), (xva, yva), test, task, batch_size=128, val_batch_size=1000,
        max_epochs=args.max_epochs, patience=3, device=dev, progress=False,
    )  # fmt: skip

    cfg = cli.ocd_config(args)
    fit, sampling = cli.fit_args(args, seed), cli.sampling_config(args, seed)
    n = min(args.train_samples, len(xtr))
    collect_loader = tensor_loader(xtr[:n], ytr[:n], 256)
    val = tensor_loader(xva, yva, 1000)
    headroom_info(
        res, seed, base, LAYER, cfg, val, task, max_samples=args.headroom_samples,
        train_loader=collect_loader,
    )  # fmt: skip
    if args.headroom_only:
        return
    # training images the base saw but collection did not (the authors' first protocol)
    seen = tensor_loader(xtr[n : n + args.seen_samples], ytr[n : n + args.seen_samples], 1000)

    def seen_rows(model: ocdwrap.OCDModel, rows: dict) -> None:
        for key, mode in (("seen_base", "base"), ("seen_ocd", "ocd"), ("seen_overfit", "overfit")):
            rows[key] = evaluate_ocd(model, seen, task, mode=mode, seed=seed)
            log(f"  {mode} on training images not collected: {rows[key]}")

    train_fn, record = train_fn_for(
        tensor_loader(xtr, ytr, 128, shuffle=True, seed=seed + 1000), task, device=dev, seed=seed
    )
    run = run_compare(
        base, LAYER, cfg, collect_loader, test, task, os.path.join(workdir, f"s{seed}-adam"),
        fit_args=fit, sampling=sampling, draws=args.draws, seed=seed,
        rows=[r for r in COMPARE_ROWS if r != "compute_matched"] if args.ocd_only else None,
        train_fn=train_fn,
        train_record=record, features=pixels, generators={"global": GlobalScale()},
        progress=args.progress, tag="fc2 adam", after=seen_rows if n < len(xtr) else None,
    )  # fmt: skip
    add_run(res, seed, run)
    if args.ocd_only:
        return

    strong = run_compare(
        base, LAYER, cfg.replace(overfit_lr=STRONG_LR), collect_loader, test, task,
        os.path.join(workdir, f"s{seed}-strong"), fit_args=fit, sampling=sampling, rows=(),
        seed=seed, agreement_samples=0, tag=f"fc2 overfit lr {STRONG_LR:g}",
    )  # fmt: skip
    res.add(seed, "overfit_strong", strong.rows["overfit"])
    overfit_all_row(
        res, seed, pristine, test, task, cfg, device=dev, max_samples=args.all_layers_samples
    )

    log("SGD overfit (paper text): calibrating its lr to Adam's delta size")
    info["sgd"] = calibrate_sgd_lr(base, cfg, xtr[: min(n, 1024)], ytr[: min(n, 1024)], task)
    log(f"  {info['sgd']}")
    sgd_cfg = cfg.replace(overfit_optimizer="sgd", overfit_lr=info["sgd"]["lr"])
    run = run_compare(
        base, LAYER, sgd_cfg, collect_loader, test, task, os.path.join(workdir, f"s{seed}-sgd"),
        fit_args=fit, sampling=sampling, rows=("ocd",), generators={"global": GlobalScale()},
        seed=seed, progress=args.progress, tag="fc2 sgd",
    )  # fmt: skip
    add_run(res, seed, run, key="sgd_ocd", prefix="sgd_")

    calib = tensor_loader(xva[:256], yva[:256], 256)
    alternative_layer_row(
        res, seed, base, LAYER, cfg, calib, collect_loader, test, task,
        os.path.join(workdir, f"s{seed}-alt"), fit_args=fit, sampling=sampling,
        linear_only=args.delta == "rank1", device=dev, progress=args.progress,
    )  # fmt: skip


def table_notes(res: Results, args: Any) -> list[str]:
    out = notes.standard_notes(res, ["loss", "acc"], {"loss": PAPER_GAP, "acc": PAPER_GAP_ACC})
    infos = list(res.info.values())
    if infos:
        out += notes.training_notes(res, "LeNet5, Adam 1e-3, batch 128", "patience 3")
        sg = [i["sgd"] for i in infos if "sgd" in i]
        if sg:
            out.append(
                f"SGD overfit lr (mean rho matched to Adam {args.overfit_lr:g} × 3 on 1,024 training images): "
                + ", ".join(
                    f"{s['lr']:.3g} (rho {s['sgd_rho_mean']:.2e} vs Adam {s['adam_rho_mean']:.2e})"
                    for s in sg
                )
            )
        rc = [
            (
                i["ocd"]["collect_summary"].get("rho_cv"),
                i["sgd_ocd"]["collect_summary"].get("rho_cv"),
            )
            for i in infos
            if "sgd_ocd" in i
        ]
        if rc:
            out.append(
                "spread of the delta size across training images, rho_cv = sd/mean: Adam "
                f"{[round(a, 3) for a, _ in rc]}, SGD {[round(b, 3) for _, b in rc]}"
            )
        out += notes.selection_note(
            res, "fc2", "256 validation images", linear_only=args.delta == "rank1"
        )
        out += notes.agreement_note(res, "sgd_ocd", prefix="SGD collection: ")
    seen = res.gap("seen_ocd", "seen_base", "seen_overfit", "loss")
    if seen:
        test = res.gap("ocd", "base", "overfit", "loss")
        out.append(
            f"the authors' first public protocol (OCD scored on {args.seen_samples} training images "
            "the base was trained on but that were not collected): OCD, 1 draw, captures "
            f"{fmt_mean_sd([100 * v for v in seen], '.1f')} % of that set's base → overfit gap in "
            f"loss, against {fmt_mean_sd([100 * v for v in test], '.1f')} % on the test set"
        )
    out.append(
        f"settings: delta={args.delta}, overfit Adam {args.overfit_lr:g} × 3, "
        f"{args.train_samples} training images overfitted, "
        f"{args.fit_steps} fit steps, K={args.draws}; test images: {args.test_samples or 10000}"
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = cli.setup(args)
    t0 = time.perf_counter()
    data = load_mnist()
    if args.smoke:
        data = {
            "train": tuple(t[:2000] for t in data["train"]),
            "val": tuple(t[:500] for t in data["val"]),
            "test": data["test"],
        }
    if args.test_samples:
        data["test"] = tuple(t[: args.test_samples] for t in data["test"])
    data = {k: tuple(t.to(args.device) for t in v) for k, v in data.items()}
    res = Results("mnist", with_overfit_lr(ROWS, args.overfit_lr), METRICS)
    return cli.run_seeds(
        args,
        res,
        lambda seed: run_seed(args, seed, data, res, workdir),
        lambda: table_notes(res, args),
        module=MODULE,
        argv=argv,
        title="MNIST / LeNet5, OCD on fc2 (120→84)",
        t0=t0,
    )


if __name__ == "__main__":
    main()
