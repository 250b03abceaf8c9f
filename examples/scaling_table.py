"""Storage and time of a collection vs training-set size, full vs rank-one deltas (docs/scaling.md).

    python -m examples.scaling_table            # seconds on two CPU cores
    python -m examples.scaling_table --smoke    # 256 samples per collection instead of 2048

Run from the repository root. One process: the collection sizes do not depend on the number of
processes (a multi-process collection writes the same shards, one part per process).

Prints (1) the bytes stored per training sample, from the formula below, next to the size of
shards actually written by ``ocdwrap.collect`` for a few layers; (2) a table of collection size
for training sets of 60k and 1.28M samples; (3) measured collection throughput.

Per sample, float32 (4 bytes) unless noted, for a target weight of shape (out, in') where
in' = in * kh * kw, conditioning widths d_in (layer input), d_act (layer output), d_out (model
output)::

    index 8 (int64) + rho 4 + 4 * (d_in + d_act + d_out)              every collection
    + energy 4                                                         Linear targets
    + delta 4 * out * in'                                              delta="full"
    + u 4 * out + v 4 * in                                             Linear on vectors (both modes)
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch
from torch import nn

import ocdwrap
from examples.data import LeNet5, tensor_loader

CE = nn.CrossEntropyLoss(reduction="none")


def bytes_per_sample(
    weight_shape: tuple[int, ...], dims: tuple[int, int, int], delta: str, vector_linear: bool
) -> int:
    """Bytes one training sample takes in a collection (the formula in the module docstring)."""
    out = weight_shape[0]
    inner = 1
    for s in weight_shape[1:]:
        inner *= s
    linear = len(weight_shape) == 2
    n = 8 + 4 + 4 * sum(dims)
    n += 4 if linear else 0
    n += 4 * out * inner if delta == "full" else 0
    n += 4 * (out + weight_shape[1]) if (linear and vector_linear) else 0
    return n


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


# layers of the table: name, weight shape, (d_in, d_act, d_out), Linear on vectors?
LAYERS = [
    ("LeNet5 fc2 (MNIST)", (84, 120), (120, 84, 10), True),
    ("ResNet-18 fc (10 classes)", (10, 512), (512, 10, 10), True),
    ("ViT-B head (ImageNet)", (1000, 768), (768, 1000, 1000), True),
    ("ResNet-18 layer4.1.conv2", (512, 512, 3, 3), (512, 512, 1000), False),
]


def measure(layer: str, delta: str, n: int = 2048) -> dict:
    """Collect ``n`` random MNIST-shaped samples on LeNet5 (two shards); shard bytes and speed."""
    torch.manual_seed(0)
    base = LeNet5().eval()
    model = ocdwrap.wrap(base, layer=layer, config=ocdwrap.OCDConfig(delta=delta))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    out = tempfile.mkdtemp(prefix="ocdwrap-scaling-")
    try:
        t0 = time.perf_counter()
        loader, shard_size = tensor_loader(x, y, 256), max(1, (n + 1) // 2)
        store = ocdwrap.collect(model, loader, CE, out, progress=False, shard_size=shard_size)
        seconds = time.perf_counter() - t0
        size = sum(os.path.getsize(p) for p in store.shard_paths())
        dims = tuple(store.dims[k] for k in ("cond_in", "cond_act", "cond_out"))
        vector = "u" in store.keys
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the sizes are read; the shards are not needed
    return {
        "layer": f"LeNet5 {layer} {tuple(store.weight_shape)}",
        "delta": delta,
        "measured": size / n,
        "formula": bytes_per_sample(store.weight_shape, dims, delta, vector),
        "samples_per_s": n / seconds,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=2048, help="samples per measured collection")
    p.add_argument("--smoke", action="store_true", help="a quick check: 256 samples")
    args = p.parse_args(argv)
    n = 256 if args.smoke else args.samples
    print(f"1. bytes per sample: formula vs shards written by ocdwrap.collect ({n} samples, 2 shards)\n")  # fmt: skip
    print(f"| {'layer':<28} | {'delta':<5} | {'formula':>9} | {'measured':>9} | {'collect/s':>9} |")
    print(f"| {'-' * 28} | {'-' * 5} | {'-' * 9} | {'-' * 9} | {'-' * 9} |")
    for layer, delta in (("fc2", "rank1"), ("fc2", "full"), ("conv2", "full")):
        r = measure(layer, delta, n)
        print(
            f"| {r['layer']:<28} | {delta:<5} | {r['formula']:>9,} | {r['measured']:>9,.0f} "
            f"| {r['samples_per_s']:>9,.0f} |"
        )

    print("\n2. collection size vs training-set size (formula)\n")
    print(f"| {'layer':<26} | {'weight':<16} | {'delta':<5} | {'per sample':>10} | {'60k':>9} | {'1.28M':>9} |")  # fmt: skip
    print(f"| {'-' * 26} | {'-' * 16} | {'-' * 5} | {'-' * 10} | {'-' * 9} | {'-' * 9} |")
    for name, shape, dims, vector in LAYERS:
        for delta in ("rank1", "full") if vector else ("full",):
            b = bytes_per_sample(shape, dims, delta, vector)
            shape_s = "x".join(str(s) for s in shape)
            print(
                f"| {name:<26} | {shape_s:<16} | {delta:<5} | {human(b):>10} "
                f"| {human(b * 60_000):>9} | {human(b * 1_281_167):>9} |"
            )


if __name__ == "__main__":
    main()
