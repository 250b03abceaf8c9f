"""The command line every benchmark script shares, and the loop over seeds that runs a table.

Every script (``python -m benchmarks.mnist``, ``.tabular``, ``.text_fewshot``,
``.fashion_mnist``) starts from :func:`base_parser` (``--seeds``, ``--json``, ``--paper``,
``--device``, ``--smoke``, ``--threads``, ``--fit-steps``, ``--draws``, ``--sampling-steps``,
``--workdir``, ``--progress``, ``--plots``, ``--delta``, ``--overfit-lr``,
``--delta-normalization``, ``--headroom-only``, ``--headroom-samples``), builds each
seed's :class:`ocdwrap.OCDConfig` with :func:`ocd_config`, and runs its seeds with
:func:`run_seeds`, which rewrites ``--json`` after every seed and prints the table at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

import ocdwrap

from .figures import plot_json
from .results import Results
from .timing import log, machine


def base_parser(
    module: str, description: str, *, seeds: Sequence[int] = (0, 1, 2)
) -> argparse.ArgumentParser:
    """The options every benchmark script has (``module``: e.g. ``benchmarks.mnist``, the name
    it runs under with ``python -m``); scripts add their own."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    p.add_argument(
        "--sampling-steps",
        type=int,
        default=10,
        help="DDIM steps at inference (default 10, the released code's; the library's is 2)",
    )
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
        "--headroom-only",
        action="store_true",
        help="train the base and run ocdwrap.headroom on the validation split, nothing else",
    )
    p.add_argument(
        "--headroom-samples",
        type=int,
        default=2000,
        help="validation samples ocdwrap.headroom scores (0: skip the report)",
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
        sampling_steps=args.sampling_steps,
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
    module: str,
    argv: Sequence[str] | None,
    title: str,
    t0: float,
) -> dict[str, Any]:
    """Run ``run_seed(seed)`` for every seed, rewriting ``--json`` after each (a stopped run
    keeps what it measured); then print the table and draw ``--plots``. Returns the JSON dict."""
    cmd = command(module, argv)

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


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reruns this run, e.g. ``python -m benchmarks.mnist --smoke``: each
    JSON stores it, and docs/results.md quotes it above the table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])
