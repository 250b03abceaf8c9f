"""Fashion-MNIST / ResNet-18 (or GoogLeNet): the paper's CIFAR-10 column, on data we have offline.

    python -m benchmarks.fashion_mnist --json runs/fashion_mnist.json     # CPU default (small!)
    python -m benchmarks.fashion_mnist --paper --json runs/fmnist_paper.json   # GPU sizes
    python -m benchmarks.fashion_mnist --cifar-root ~/data/cifar10 --arch googlenet --paper
    python -m benchmarks.fashion_mnist --smoke

The paper's second image experiment is GoogLeNet on CIFAR-10. CIFAR-10 cannot be obtained on
this project's machines (no network), so the default runs the same protocol on Fashion-MNIST
(Debian's ``dataset-fashion-mnist``: 55k train / 5k validation / 10k test, 28x28 grey). With
``--cifar-root`` pointing at a torchvision CIFAR-10 folder (``torchvision.datasets.CIFAR10(root,
download=True)`` on a connected machine) the same script runs on CIFAR-10 (45k / 5k / 10k).

Per seed: ``zoo.resnet18_small`` (``--arch googlenet``: ``zoo.googlenet_small``), random init,
trained with Adam 1e-3, batch 128, early stopping on the validation split (best weights kept);
OCD on ``fc`` (the last fully connected layer: the paper's pick for GoogLeNet on CIFAR-10, and
ResNet-18's only Linear layer), the base's training images overfitted (Adam 5e-4 x 3), then on
the test images: base, compute-matched base, OCD, OCD(K), global rho, regression generator,
nearest neighbour (pixel space), overfit ``fc`` on test and every layer overfitted per test
image. The alternative layer (a Conv2d: ``select_layer``'s top-ranked layer other than ``fc``)
needs the full-matrix UNet and runs only with ``--delta full`` (``--paper``).

CPU default, sized for two shared cores (a ResNet-18 forward/backward on a 28x28 image costs
~0.1 s there): three seeds, 3,000 training / 1,000 validation images, at most 10 epochs
(patience 3), 2,000 test images, 100 test images for the all-layers row. It is a small-data
stand-in, not a reproduction of the paper's CIFAR-10 numbers.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from ocdwrap.generators import GlobalScale

from . import cli, notes
from .datasets import load_fashion_mnist, tensor_loader
from .experiment import (
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
from .results import Metric, Results, Row, with_overfit_lr
from .scoring import Task
from .timing import log
from .zoo import googlenet_small, resnet18_small

MODULE = "benchmarks.fashion_mnist"

LAYER = "fc"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

# paper, CIFAR-10 / GoogLeNet (different data and network: context for the protocol)
ROWS = table_rows(
    [
        "base", "compute_matched", "ocd", "ocd_k", "global", "regression", "nearest", "own_label",
        "probe", "overfit", Row("overfit_all", "overfit ALL layers on test (Adam 5e-4 × 3; subset)"),
    ],
    layer=LAYER,
    space="pixel space",
    labels={"base": "base (early stopping on val split)", "ocd": "OCD on fc, 1 draw"},
    paper={
        "base": {"loss": "0.085 ± 0.01", "acc": "92.85 ± 0.40"},
        "ocd": {"loss": "0.080 ± 0.01", "acc": "93.68 ± 0.38"},
        "global": {"loss": "0.084", "acc": "93.01"},
        "nearest": {"loss": "0.082", "acc": "93.03"},
        "overfit": {"loss": "0.075", "acc": "100"},
    },
)  # fmt: skip
ALT_ROW = Row("alt", "alternative layer (see notes), 1 draw", {"loss": "0.084", "acc": "92.96"})
METRICS = [Metric("loss", "test CE", ".4f"), Metric("acc", "test acc %", ".2f")]
PAPER_GAP = {"ocd": (0.085 - 0.080) / (0.085 - 0.075), "ocd_k": None}
PAPER_GAP_ACC = {"ocd": (93.68 - 92.85) / (100 - 92.85), "ocd_k": None}


def parse_args(argv: list[str] | None) -> Any:
    p = cli.base_parser(MODULE, __doc__)
    p.add_argument("--arch", choices=["resnet18", "googlenet"], default="resnet18")
    p.add_argument(
        "--cifar-root", default=None, help="a torchvision CIFAR-10 folder (else Fashion-MNIST)"
    )
    p.add_argument(
        "--train-images", type=int, default=3000, help="base training images (all are overfitted)"
    )
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument(
        "--all-layers-samples", type=int, default=100, help="test images for the all-layers row"
    )
    p.add_argument("--max-epochs", type=int, default=10)
    p.add_argument("--patience", type=int, default=3)
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.train_images, args.val_images, args.test_samples = 64, 32, 32
        args.all_layers_samples, args.max_epochs, args.patience = 4, 1, 1
        args.fit_steps = args.fit_steps or 10
        args.draws = 2
    if args.paper:
        args.train_images = args.val_images = args.test_samples = args.all_layers_samples = 0  # all
        args.max_epochs, args.patience = 100, 5
    return cli.resolve_defaults(args)


def load_cifar10(root: str, seed: int = 0) -> dict:
    """torchvision's CIFAR-10 from ``root`` (no download here): 45k / 5k / 10k, normalised."""
    from torchvision.datasets import CIFAR10

    def tensors(train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = CIFAR10(root, train=train, download=False)
        x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(
            1, 3, 1, 1
        )
        return x, torch.tensor(ds.targets, dtype=torch.int64)

    x, y = tensors(True)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:5000], perm[5000:]
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": tensors(False)}


def run_seed(args: Any, seed: int, data: dict, res: Results, workdir: str) -> None:
    dev = args.device
    task = Task.classification()
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    test = tensor_loader(xte, yte, 250)
    res.info[seed] = {}

    log(f"seed {seed}: training {args.arch} on {len(xtr)} images to convergence")
    torch.manual_seed(seed)
    make = resnet18_small if args.arch == "resnet18" else googlenet_small
    base = make(num_classes=10, in_channels=xtr.shape[1])
    pristine = base_row(
        res, seed, base, (xtr, ytr), (xva, yva), test, task, batch_size=128, val_batch_size=250,
        max_epochs=args.max_epochs, patience=args.patience, device=dev, progress=True,
    )  # fmt: skip

    cfg = cli.ocd_config(args)
    fit, sampling = cli.fit_args(args, seed), cli.sampling_config(args, seed)
    val = tensor_loader(xva, yva, 250)
    headroom_info(
        res, seed, base, LAYER, cfg, val, task, max_samples=args.headroom_samples,
        train_loader=tensor_loader(xtr, ytr, 250),
    )  # fmt: skip
    if args.headroom_only:
        return
    train_fn, record = train_fn_for(
        tensor_loader(xtr, ytr, 128, shuffle=True, seed=seed + 1000), task, device=dev, seed=seed
    )
    run = run_compare(
        base, LAYER, cfg, tensor_loader(xtr, ytr, 128), test, task, os.path.join(workdir, f"s{seed}-fc"),
        fit_args=fit, sampling=sampling, draws=args.draws, seed=seed, train_fn=train_fn,
        train_record=record, features=pixels, generators={"global": GlobalScale()},
        progress=args.progress, tag="fc",
    )  # fmt: skip
    add_run(res, seed, run)

    overfit_all_row(
        res, seed, pristine, test, task, cfg, device=dev,
        max_samples=args.all_layers_samples or None, chunk=8,
    )  # fmt: skip

    if args.delta == "full":
        calib = tensor_loader(xva[:64], yva[:64], 64)
        alternative_layer_row(
            res, seed, base, LAYER, cfg, calib, tensor_loader(xtr, ytr, 64), test, task,
            os.path.join(workdir, f"s{seed}-alt"), fit_args=fit, sampling=sampling,
            linear_only=False, device=dev, progress=args.progress,
        )  # fmt: skip


def table_notes(res: Results, args: Any, dataset: str) -> list[str]:
    out = notes.standard_notes(res, ["loss", "acc"], {"loss": PAPER_GAP, "acc": PAPER_GAP_ACC})
    out += notes.training_notes(
        res,
        f"{args.arch}, Adam 1e-3, batch 128",
        f"patience {args.patience}, at most {args.max_epochs} epochs",
    )
    if args.delta == "rank1":
        out.append(
            "alternative layer: not run. Every other layer of the network is a Conv2d, whose delta is not "
            "rank one; it needs the full-matrix UNet (--delta full / --paper), too slow to train on a CPU"
        )
    out += notes.selection_note(res, LAYER, "64 validation images", linear_only=False)
    sizes = [args.train_images or "all", args.val_images or "all", args.test_samples or "all"]
    out.append(
        f"data: {dataset}; train / val / test images {sizes}; all-layers row on the first "
        f"{args.all_layers_samples or 'all'} test images; delta={args.delta}, {args.fit_steps} fit steps, K={args.draws}"
    )
    out.append(
        "paper columns: GoogLeNet on CIFAR-10 (not available offline here); context for the protocol only"
    )
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workdir = cli.setup(args)
    t0 = time.perf_counter()
    if args.cifar_root:
        data, dataset = load_cifar10(args.cifar_root), "CIFAR-10"
    else:
        data, dataset = load_fashion_mnist(), "Fashion-MNIST"
    limits = {"train": args.train_images, "val": args.val_images, "test": args.test_samples}
    data = {k: tuple(t[: limits[k] or None].to(args.device) for t in v) for k, v in data.items()}
    rows = ROWS + ([ALT_ROW] if args.delta == "full" else [])
    res = Results("fashion_mnist", with_overfit_lr(rows, args.overfit_lr), METRICS)
    return cli.run_seeds(
        args,
        res,
        lambda seed: run_seed(args, seed, data, res, workdir),
        lambda: table_notes(res, args, dataset),
        module=MODULE,
        argv=argv,
        title=f"{dataset} / {args.arch}, OCD on fc",
        t0=t0,
    )


if __name__ == "__main__":
    main()
