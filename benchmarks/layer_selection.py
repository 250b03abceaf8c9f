"""Benchmark: which layer does the loss-entropy criterion pick, and how long does it take?

Trains three base models on CPU-sized data, runs :func:`ocdwrap.select.select_layer` on each
with both perturbations, prints every candidate's score and compares the pick with the paper's:

* LeNet5 on MNIST (20k training images, early stopping on 5k validation images, patience 3);
  paper: the next-to-last fully connected layer, fc2 (120 -> 84);
* TabularMLP on California Housing (Gorishniy et al.'s split, early stopping, patience 8);
  paper: the first layer (blocks.0.linear);
* resnet18_small on a 3k-image Fashion-MNIST subset (MNIST if Fashion-MNIST is absent), trained
  for one epoch: enough for a ranking, not converged. Paper (GoogLeNet on CIFAR10):
  the last fully connected layer (fc). Its 21 candidates are scored with 16 draws on 16
  calibration samples (a ResNet-18 forward per draw and sample is the cost on a CPU).

Selection time is reported as a ratio to one training epoch of LeNet5 on the same 20k images,
measured in the same run. Training stops on epochs, never on time, so the models (and the
scores) do not depend on the machine's load; only the timings do. About 3 minutes on an idle
2-core CPU (estimate); 27 minutes when the 2 cores were shared at a load average of 8.

    python -m benchmarks.layer_selection --seed 0 --json runs/layer_selection.json
    python -m benchmarks.layer_selection --smoke      # tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ocdwrap.select import select_layer

from . import datasets, zoo
from .cli import command
from .results import write_json
from .scoring import CE, mse
from .timing import machine, one_epoch_seconds

MODULE = "benchmarks.layer_selection"


def run_selection(
    name: str, model: nn.Module, calib: Any, loss_fn: Any, paper: str, seed: int, **kw: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {"paper_pick": paper}
    for perturbation in ("gaussian", "reinit"):
        scores = select_layer(
            model, calib, loss_fn, perturbation=perturbation, seed=seed, progress=False, **kw
        )
        print(f"\n### {name}, perturbation={perturbation}\n\n{scores}\n", flush=True)
        out[perturbation] = scores.to_dict()
    return out


def released_pick(scores: dict[str, Any]) -> str:
    """The layer the released code's criterion (max over draws of the entropy over samples) picks."""
    return max(scores["layers"], key=lambda s: s["released_score"])["name"]


def lenet_mnist(seed: int, smoke: bool) -> dict[str, Any]:
    d = datasets.load_mnist(seed=seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d["train"][1]), generator=g)[: 2000 if smoke else 20_000]
    x, y = d["train"][0][idx], d["train"][1][idx]
    train = datasets.tensor_loader(x, y, 128, shuffle=True, seed=seed)
    val = datasets.tensor_loader(d["val"][0][:5000], d["val"][1][:5000], 1000)
    test = datasets.tensor_loader(*d["test"], 1000)
    torch.manual_seed(seed)
    model = zoo.LeNet5()
    tr = zoo.train_base(model, train, val, CE, max_epochs=1 if smoke else 20, patience=3, seed=seed)
    metrics = zoo.evaluate(model, test, CE)
    print(f"LeNet5/MNIST: {tr.epochs_run} epochs, test {metrics}", flush=True)
    epoch_s = min(one_epoch_seconds(model, train, CE) for _ in range(2))  # less noise from load
    n = 64 if smoke else 256
    calib = datasets.tensor_loader(x[:n], y[:n], 128)
    out = run_selection("LeNet5 / MNIST", model, calib, CE, "fc2", seed)
    loop = select_layer(model, calib, CE, seed=seed, progress=False, vectorize=False)
    out.update(
        train={
            "epochs": tr.epochs_run,
            "best_epoch": tr.best_epoch,
            "seconds": tr.seconds,
            "samples": len(y),
            "stopped_early": tr.stopped_early,
        },
        test=metrics,
        epoch_seconds=epoch_s,
        loop_seconds_gaussian=loop.seconds,
        best_by_seed={
            s: select_layer(model, calib, CE, seed=s, progress=False).best for s in range(5)
        },
    )
    for p in ("gaussian", "reinit"):
        out[p]["ratio_to_epoch"] = out[p]["seconds"] / epoch_s
    return out


def mlp_california(seed: int, smoke: bool) -> dict[str, Any]:
    d = datasets.load_california_housing(seed=seed)
    train = datasets.tensor_loader(*d["train"], 256, shuffle=True, seed=seed)
    val = datasets.tensor_loader(*d["val"], 1024)
    test = datasets.tensor_loader(*d["test"], 1024)
    torch.manual_seed(seed)
    model = zoo.TabularMLP(8)
    tr = zoo.train_base(
        model,
        train,
        val,
        mse,
        max_epochs=1 if smoke else 60,
        patience=8,
        seed=seed,
    )
    metrics = zoo.evaluate(model, test, mse, task="regression")
    metrics["mse_original_units"] = metrics["loss"] * d["y_std"] ** 2
    print(f"TabularMLP/California: {tr.epochs_run} epochs, test {metrics}", flush=True)
    calib = datasets.tensor_loader(d["train"][0][:256], d["train"][1][:256], 128)
    out = run_selection(
        "TabularMLP / California Housing", model, calib, mse, "blocks.0.linear", seed
    )
    out.update(
        train={
            "epochs": tr.epochs_run,
            "best_epoch": tr.best_epoch,
            "seconds": tr.seconds,
            "stopped_early": tr.stopped_early,
        },
        test=metrics,
    )
    return out


def resnet_fashion(seed: int, smoke: bool) -> dict[str, Any]:
    try:
        d, data_name = datasets.load_fashion_mnist(seed=seed), "Fashion-MNIST"
    except datasets.DatasetUnavailableError:
        d, data_name = datasets.load_mnist(seed=seed), "MNIST"
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(d["train"][1]), generator=g)[: 128 if smoke else 3000]
    x, y = d["train"][0][idx], d["train"][1][idx]
    train = datasets.tensor_loader(x, y, 64, shuffle=True, seed=seed)
    n_val, n_test = (64, 128) if smoke else (1000, 2000)
    val = datasets.tensor_loader(d["val"][0][:n_val], d["val"][1][:n_val], 250)
    test = datasets.tensor_loader(d["test"][0][:n_test], d["test"][1][:n_test], 250)
    torch.manual_seed(seed)
    model = zoo.resnet18_small()
    tr = zoo.train_base(
        model,
        train,
        val,
        CE,
        max_epochs=1,
        patience=1,
        seed=seed,
    )
    metrics = zoo.evaluate(model, test, CE)
    print(f"resnet18_small/{data_name}: {tr.epochs_run} epochs, test {metrics}", flush=True)
    n = 4 if smoke else 16
    calib = datasets.tensor_loader(x[:n], y[:n], n)
    out = run_selection(
        f"resnet18_small / {data_name}", model, calib, CE, "fc", seed, draws=2 if smoke else 16
    )
    out.update(
        data=data_name,
        train={"epochs": tr.epochs_run, "seconds": tr.seconds, "train_samples": len(y)},
        test=metrics,
    )
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, to check the script runs: not a result"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "command": command(MODULE, argv),
        "seed": args.seed,
        "date": datetime.date.today().isoformat(),
        "machine": machine("cpu"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    results["lenet5_mnist"] = lenet_mnist(args.seed, args.smoke)
    results["mlp_california"] = mlp_california(args.seed, args.smoke)
    results["resnet18_fashion"] = resnet_fashion(args.seed, args.smoke)
    results["total_seconds"] = time.perf_counter() - start

    le = results["lenet5_mnist"]
    print(
        "\n## Summary\n\n| model | paper | gaussian pick | reinit pick | released-code criterion "
        "pick (gaussian / reinit) | selection s (gaussian / reinit) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for key in ("lenet5_mnist", "mlp_california", "resnet18_fashion"):
        r = results[key]
        g, ri = r["gaussian"], r["reinit"]
        print(
            f"| {key} | {r['paper_pick']} | {g['best']} | {ri['best']} | "
            f"{released_pick(g)} / {released_pick(ri)} | {g['seconds']:.1f} / {ri['seconds']:.1f} |"
        )
    print(
        f"\nLeNet5: one training epoch ({le['train']['samples']} images) {le['epoch_seconds']:.2f} s; selection = "
        f"{le['gaussian']['ratio_to_epoch']:.2f} (gaussian) / {le['reinit']['ratio_to_epoch']:.2f} "
        f"(reinit) epochs; per-draw loop instead of vmap: {le['loop_seconds_gaussian']:.2f} s. "
        f"Best layer by seed 0-4: {le['best_by_seed']}. Total {results['total_seconds']:.0f} s."
    )
    if args.json:
        write_json(args.json, results, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
