"""The command line every benchmark script shares, and the loop over seeds that runs a table.

Every script (``python -m benchmarks.mnist``, ``.tabular``, ``.text_fewshot``,
``.fashion_mnist``) starts from :func:`base_parser` (``--seeds``, ``--json``, ``--paper``,
``--device``, ``--smoke``, ``--threads``, ``--fit-steps``, ``--draws``, ``--sampling-steps``,
``--workdir``, ``--progress``, ``--plots``, ``--delta``, ``--overfit-lr``,
``--delta-normalization``, ``--headroom-only``, ``--headroom-samples``), builds each
seed's :class:`ocdwrap.OCDConfig` with :func:`ocd_config`, its :class:`ocdwrap.FitArgs` with
:func:`fit_args` and its :class:`ocdwrap.SamplingConfig` with :func:`sampling_config`, and runs
its seeds with :func:`run_seeds`, which rewrites ``--json`` after every seed and prints the
table at the end.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import ocdwrap

from .figures import plot_json
from .results import Results, write_json
from .timing import log, machine, peak_rss_mb


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


def ocd_config(args: argparse.Namespace, **kw: Any) -> ocdwrap.OCDConfig:
    """The OCDConfig of one run: the paper's (``--paper``), a small UNet for ``--delta full``
    on a CPU (two cores cannot train the paper's), or rank-one deltas; ``kw`` overrides."""
    base = dict(
        delta=args.delta,
        overfit_lr=args.overfit_lr,
        delta_normalization=args.delta_normalization,
    )
    base.update(kw)
    if args.paper:
        return ocdwrap.OCDConfig.paper(**base)
    if args.delta == "full":
        return ocdwrap.OCDConfig(**base, unet_channels=(16, 32, 32))
    return ocdwrap.OCDConfig(**base)


def fit_args(args: argparse.Namespace, seed: int, **kw: Any) -> ocdwrap.FitArgs:
    """The FitArgs of one run: ``--fit-steps`` steps seeded with ``seed``, no checkpoints, in
    minibatches of 128 (``--paper``), 32 (the small UNet of ``--delta full`` on a CPU) or 256
    (rank-one deltas); ``kw`` overrides."""
    base: dict[str, Any] = dict(steps=args.fit_steps, seed=seed, checkpoint_every=0)
    if not args.paper:
        base["batch_size"] = 32 if args.delta == "full" else 256
    base.update(kw)
    return ocdwrap.FitArgs.paper(**base) if args.paper else ocdwrap.FitArgs(**base)


def sampling_config(args: argparse.Namespace, seed: int, **kw: Any) -> ocdwrap.SamplingConfig:
    """The SamplingConfig of one run: ``--sampling-steps`` DDIM steps, noise seeded with
    ``seed``; ``kw`` overrides (e.g. ``task="regression"``)."""
    return ocdwrap.SamplingConfig(**{"sampling_steps": args.sampling_steps, "seed": seed, **kw})


def recorded(
    cfg: ocdwrap.OCDConfig, fit: ocdwrap.FitArgs, sampling: ocdwrap.SamplingConfig
) -> dict[str, Any]:
    """A run's settings as its JSON records them: the OCDConfig's fields under ``config``, the
    FitArgs under ``fit_args``, the SamplingConfig under ``sampling``."""
    return {"config": cfg.to_dict(), "fit_args": fit.to_dict(), "sampling": sampling.to_dict()}


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


@dataclass
class Part:
    """One table of a benchmark with several (scenes, speaker counts, data sets): its results,
    title, and what :func:`run_parts` calls for it.

    ``run_seed(seed)`` fills ``res`` for one seed and returns what ``figure`` draws (or None);
    ``notes()`` gives the table's notes; ``figure(seed, value)`` draws the part's figure from the
    first seed's value and returns its path; ``extra()`` gives more fields of its JSON.
    """

    name: str
    res: Results
    title: str
    run_seed: Callable[[int], Any]
    notes: Callable[[], list[str]]
    figure: Callable[[int, Any], str] | None = None
    extra: Callable[[], dict[str, Any]] = field(default=lambda: {})


def run_parts(
    args: argparse.Namespace,
    parts: Iterable[Part],
    *,
    benchmark: str,
    module: str,
    argv: Sequence[str] | None,
    t0: float,
    head: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`run_seeds` for a benchmark of several tables: every seed of every part (``parts``
    may be a generator, so a part's data is loaded when its turn comes), one JSON with the parts
    under ``"datasets"`` (and the ``head`` fields) rewritten after each seed, each part's
    table printed at the end, ``--plots`` drawn. Returns the JSON dict."""
    cmd = command(module, argv)
    out: dict[str, Any] = {
        "benchmark": benchmark,
        "command": cmd,
        "settings": vars(args),
        **(head or {}),
        "datasets": {},
    }
    reports = []
    for part in parts:
        for seed in args.seeds:
            value = part.run_seed(seed)
            part.res.notes = part.notes()
            out["datasets"][part.name] = part.res.to_json(
                title=part.title, command=cmd, **part.extra()
            )
            out["seconds"] = time.perf_counter() - t0
            out["peak_rss_mb"] = peak_rss_mb()
            write_json(args.json, out)
            if args.plots and part.figure and value and seed == args.seeds[0]:
                log(f"wrote {part.figure(seed, value)}")
        minutes = (time.perf_counter() - t0) / 60
        reports.append(
            part.res.report(f"{part.title}; {machine(args.device)}; {minutes:.1f} min\n`{cmd}`")
        )
    for r in reports:
        print(r)
    if args.plots:
        for path in plot_json(out, args.plots):
            log(f"wrote {path}")
    return out


def merge_runs(
    paths: Sequence[str],
    command: str,
    *,
    benchmark: str,
    parts_setting: str,
    part_value: Callable[[str], Any],
    make_part: Callable[[argparse.Namespace, str], Part],
) -> dict[str, Any]:
    """One JSON of a multi-part benchmark (:func:`run_parts`) from the JSONs of several runs, e.g.
    the seeds of one part run by two processes, or two parts run apart: per part, every seed's
    rows and info, the table and notes made anew by ``make_part(settings, name)``.

    The runs must agree on every setting but the parts (``parts_setting``, e.g. ``scenes``; each
    part name maps to its value there by ``part_value``), ``--seeds`` and where they wrote; a part
    and seed found in two runs is an error (no row is silently replaced)."""
    import json

    loaded = []
    for path in paths:
        with open(path) as f:
            loaded.append(json.load(f))
    ignore = {parts_setting, "seeds", "json", "plots", "workdir", "progress", "merge"}

    def same(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d["settings"].items() if k not in ignore}

    for path, d in zip(paths[1:], loaded[1:]):
        if same(d) != same(loaded[0]):
            diff = sorted(k for k in same(d) if same(d)[k] != same(loaded[0]).get(k))
            raise SystemExit(f"--merge: {path} was run with other settings than {paths[0]}: {diff}")
    settings = dict(loaded[0]["settings"])
    commands = [d["command"] for d in loaded]
    out: dict[str, Any] = {
        "benchmark": benchmark,
        "command": " && ".join([*commands, command]),
        "merged_from": {p: d["command"] for p, d in zip(paths, loaded)},
        "settings": settings,
        "seconds": sum(d.get("seconds", 0.0) for d in loaded),
        "run_seconds": [d.get("seconds", 0.0) for d in loaded],  # the processes may have overlapped
        "datasets": {},
    }
    peaks = [d["peak_rss_mb"] for d in loaded if "peak_rss_mb" in d]
    if peaks:
        out["peak_rss_mb"] = max(peaks)
    names = list(dict.fromkeys(n for d in loaded for n in d["datasets"]))
    settings[parts_setting] = [part_value(n) for n in names]
    args = argparse.Namespace(**settings)
    for name in names:
        part = make_part(args, name)
        res = part.res
        for path, d in zip(paths, loaded):
            got = d["datasets"].get(name)
            for seed, rows in (got or {}).get("per_seed", {}).items():
                if int(seed) in res.per_seed:
                    raise SystemExit(
                        f"--merge: {name} seed {seed} is in two runs (again in {path})"
                    )
                for key, metrics in rows.items():
                    res.add(int(seed), key, metrics)
                res.info[int(seed)] = got["info"][seed]
        res.per_seed = dict(sorted(res.per_seed.items()))
        res.info = dict(sorted(res.info.items()))
        res.notes = part.notes()
        out["datasets"][name] = res.to_json(
            title=part.title, command=out["command"], **part.extra()
        )
    settings["seeds"] = sorted({int(s) for p in out["datasets"].values() for s in p["per_seed"]})
    return out


def merge_main(args: argparse.Namespace, merged: dict[str, Any]) -> dict[str, Any]:
    """Write a :func:`merge_runs` JSON to ``--json`` and print each part's table and notes."""
    write_json(args.json, merged)
    for part in merged["datasets"].values():
        print(f"{part['title']}: seeds {sorted(int(s) for s in part['per_seed'])}")
        print(part["table"] + "\n\n" + "\n".join(f"- {n}" for n in part["notes"]) + "\n")
    log(f"wrote {args.json}")
    return merged


def add_merge_option(p: argparse.ArgumentParser, parts: str) -> None:
    """``--merge JSON...`` (:func:`merge_runs`); ``parts`` names what the runs may differ in."""
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help=f"merge the JSONs of several runs (other seeds or {parts}, same settings) into "
        "--json; runs nothing",
    )


def merge_requested(p: argparse.ArgumentParser, args: argparse.Namespace) -> bool:
    """Whether ``--merge`` was given (an error naming the fix when ``--json`` is missing)."""
    if args.merge and not args.json:
        p.error("--merge needs --json, the merged file to write")
    return bool(args.merge)


def command(module: str, argv: Sequence[str] | None) -> str:
    """The command line that reruns this run, e.g. ``python -m benchmarks.mnist --smoke``: each
    JSON stores it, and docs/results.md quotes it above the table."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", "-m", module, *map(shlex.quote, argv)])
