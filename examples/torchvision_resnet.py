"""OCD on a torchvision ResNet-18, Fashion-MNIST, two CPU cores.

    python -m examples.torchvision_resnet                        # fc, rank-one deltas, a few minutes
    python -m examples.torchvision_resnet --layer layer4.1.conv2 --delta full --train-samples 200
    python -m examples.torchvision_resnet --train-samples 55000 --epochs 10 --device cuda
    python -m examples.torchvision_resnet --smoke                # 64 images, one epoch: seconds

Run from the repository root (the data loader and training loop live in ``examples/data.py``).

torchvision models need no adapter: ocdwrap wraps any nn.Linear or nn.Conv2d by its module name
(``fc``, ``classifier.1``, ``layer4.1.conv2``). Steps: train torchvision's ResNet-18 (random init;
no pretrained weights offline; a 1-channel stem) on a subset of Fashion-MNIST, wrap ``fc``,
overfit it on every training sample (collect), fit the hypernetwork, and score the base model,
OCD, OCD(5) and overfit-on-test (the upper bound) on held-out test images.
Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
from torch import nn
from torchvision.models import resnet18

import ocdwrap
from examples.data import load_fashion_mnist, tensor_loader, train_base

CE = nn.CrossEntropyLoss(reduction="none")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resnet18_fashion(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 with a 1-channel stem (28x28 grey images reach layer4 at 1x1)."""
    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


# --smoke: a run of seconds that goes through every step; its numbers mean nothing
SMOKE = {
    "train_samples": 64,
    "val_samples": 64,
    "test_samples": 32,
    "epochs": 1,
    "fit_steps": 20,
    "draws": 2,
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--layer", default="fc", help="the module to make per-input (default fc)")
    p.add_argument("--delta", choices=["rank1", "full"], default="rank1")
    p.add_argument("--train-samples", type=int, default=3000)
    p.add_argument("--val-samples", type=int, default=1000, help="for early stopping")
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=3, help="base training epochs at most")
    p.add_argument("--fit-steps", type=int, default=1000)
    p.add_argument("--draws", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (64 training and 32 test images, one epoch, 20 fit steps; replaces the "
        "size options): checks that every step runs, in seconds",
    )
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    data = load_fashion_mnist(seed=args.seed)
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    xtr, ytr = xtr[: args.train_samples], ytr[: args.train_samples]
    xva, yva = xva[: args.val_samples], yva[: args.val_samples]
    xte, yte = xte[: args.test_samples], yte[: args.test_samples]

    log(f"1/4 training ResNet-18 on {len(xtr)} Fashion-MNIST images ({args.device})")
    t0 = time.perf_counter()
    base = resnet18_fashion()
    tr = train_base(
        base,
        tensor_loader(xtr, ytr, 64, shuffle=True, seed=args.seed),
        tensor_loader(xva, yva, 500),
        CE,
        max_epochs=args.epochs,
        patience=2,
        device=args.device,
        seed=args.seed,
    )
    t_train = time.perf_counter() - t0
    log(f"   {tr.epochs_run} epochs, best val loss {tr.best_val_loss:.4f}, {t_train:.0f} s")

    config = ocdwrap.OCDConfig(delta=args.delta)
    fit_args = ocdwrap.FitArgs(steps=args.fit_steps, batch_size=256)
    if args.delta == "full":  # a small UNet; the paper's size wants a GPU
        config = config.replace(unet_channels=(16, 32, 32))
        fit_args = fit_args.replace(batch_size=32)
    sampling = ocdwrap.SamplingConfig(seed=args.seed)
    model = ocdwrap.wrap(base.eval(), layer=args.layer, config=config, sampling=sampling)
    log(f"2/4 overfitting {args.layer} {tuple(model.weight_shape)} on each training image alone")
    workdir = tempfile.mkdtemp(prefix="ocdwrap-resnet-")
    t0 = time.perf_counter()
    store = ocdwrap.collect(model, tensor_loader(xtr, ytr, 250), CE, f"{workdir}/deltas")
    t_collect = time.perf_counter() - t0

    log(f"3/4 fitting the hypernetwork ({args.fit_steps} steps)")
    t0 = time.perf_counter()
    report = ocdwrap.fit(model, store, fit_args)
    t_fit = time.perf_counter() - t0

    log(f"4/4 evaluating on {len(xte)} test images")
    test = tensor_loader(xte, yte, 500)
    t0 = time.perf_counter()
    rows = {
        "base ResNet-18": ocdwrap.evaluate_ocd(model, test, CE, mode="base"),
        "OCD (1 draw)": ocdwrap.evaluate_ocd(model, test, CE, seed=args.seed),
        f"OCD({args.draws})": ocdwrap.evaluate_ocd(model, test, CE, num_draws=args.draws),
        "overfit on test (upper bound)": ocdwrap.evaluate_ocd(model, test, CE, mode="overfit"),
    }
    t_eval = time.perf_counter() - t0

    if args.smoke:
        print("\nsmoke run (--smoke): tiny sizes; the numbers below say nothing about OCD")
    print(f"\nResNet-18 / Fashion-MNIST, layer {args.layer}, delta={args.delta}")
    print(f"train {len(xtr)}, test {len(xte)}, {report.steps} fit steps, seed {args.seed}\n")
    print(f"| {'row':<30} | {'test CE':>8} | {'acc %':>6} |")
    print(f"| {'-' * 30} | {'-' * 8} | {'-' * 6} |")
    for name, r in rows.items():
        print(f"| {name:<30} | {r['loss']:>8.4f} | {100 * r['accuracy']:>6.2f} |")
    total = time.perf_counter() - t_start
    print(
        f"\ntimes: train {t_train:.0f} s, collect {t_collect:.0f} s ({len(store)} samples), "
        f"fit {t_fit:.0f} s, evaluate {t_eval:.0f} s, total {total:.0f} s"
    )
    return {"rows": rows, "seconds": total}


if __name__ == "__main__":
    main()
