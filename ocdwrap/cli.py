"""The ``ocdwrap`` command line (also ``python -m ocdwrap``).

    ocdwrap info DIR                       what an adapter, a collection or a fit checkpoint holds
    ocdwrap collect --model M --data D --loss L --layer NAME --out deltas/
    ocdwrap fit --model M --deltas deltas/ --out adapter/
    ocdwrap evaluate --model M --adapter adapter/ --data D --loss L
    ocdwrap headroom --model M --data D --loss L --layer NAME   can OCD help? (before collecting)
    ocdwrap compare --model M --train-data T --data D --layer NAME --out runs/cmp   OCD vs controls

``M`` and ``D`` are import paths, ``package.module:name`` or ``path/to/file.py:name``, naming a
module / data loader or a function that returns one (called with no arguments). ``L`` is
``cross_entropy``, ``mse``, ``hf`` (the loss a Hugging Face model trains with) or an import
path of a per-sample loss function. Under ``accelerate launch -m ocdwrap ...`` (more than one
process) ``collect`` shards the data over the processes and ``fit`` runs with DDP.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .describe import describe, describe_collection, print_info
from .errors import OCDError


# --- loading what the user names -----------------------------------------------------------------
def load_object(path: str, *, call: bool = True) -> Any:
    """Resolve ``package.module:name`` or ``file.py:name``; call it if it is a plain function.

    Example:
        >>> load_object("torch.nn:Identity")     # a class is called: an nn.Identity() instance
    """
    if ":" not in path:
        raise ValueError(
            f"{path!r} is not an import path; write 'package.module:name' or 'file.py:name'."
        )
    module_name, _, attr = path.rpartition(":")
    if module_name.endswith(".py") or os.sep in module_name:
        spec = importlib.util.spec_from_file_location(
            os.path.splitext(os.path.basename(module_name))[0], module_name
        )
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"Cannot import {module_name}.")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)))
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    import torch

    if call and callable(obj) and not isinstance(obj, torch.nn.Module):
        obj = obj()
    return obj


def _loss(name: str, model: Any) -> Callable:
    import torch.nn.functional as F

    if name == "cross_entropy":
        return lambda p, y: F.cross_entropy(p.float(), y, reduction="none")
    if name == "mse":
        return lambda p, y: (
            ((p.float() - y.float().view_as(p)) ** 2).reshape(p.shape[0], -1).mean(1)
        )
    if name == "hf":
        from .integrations.transformers import hf_loss_fn

        return hf_loss_fn(model)
    return load_object(name, call=False)


def _config(args: argparse.Namespace, base: dict[str, Any] | None = None):
    from .config import OCDConfig
    from .errors import ConfigError
    from .settings import MOVED, _moved_message, split_legacy

    d: dict[str, Any] = split_legacy(base or {})["OCDConfig"]  # a 0.1.0 manifest's flat config
    given: dict[str, Any] = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            given.update(json.load(f))
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}.")
        try:
            given[key] = json.loads(value)
        except json.JSONDecodeError:
            given[key] = value  # a bare string such as rank1
    moved = [k for k in given if k in MOVED]
    if moved:
        raise ConfigError(_moved_message(moved) + " On the command line: ocdwrap fit --help.")
    return OCDConfig.from_dict({**d, **given})


def _model(args: argparse.Namespace):
    model = load_object(args.model)
    if args.device:
        model = model.to(args.device)
    return model


def _accelerator():
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import Accelerator

        return Accelerator(cpu=not torch.cuda.is_available())
    return None


# --- subcommands ----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    infos = describe(args.directory)
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    else:
        for info in infos:
            print_info(info)
    return 0


def cmd_collect(args: argparse.Namespace) -> int:
    import ocdwrap

    from .distributed import collect_distributed

    accelerator = _accelerator()
    base = _model(args)
    data = load_object(args.data)
    loss = _loss(args.loss, base)
    config = _config(args)
    calibration = load_object(args.calibration) if args.calibration else data
    model = ocdwrap.wrap(
        base, layer=args.layer, config=config, calibration=calibration, loss_fn=loss
    )
    if accelerator is not None:
        model.to(accelerator.device)
    # one process: the same as ocdwrap.collect
    store = collect_distributed(
        model,
        data,
        loss,
        args.out,
        accelerator=accelerator,
        max_samples=args.max_samples,
        overwrite=args.overwrite,
        shard_size=args.shard_size,
    )
    if accelerator is None or accelerator.is_main_process:
        print_info(describe_collection(store.directory))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import ocdwrap

    accelerator = _accelerator()
    store = ocdwrap.DeltaStore(args.deltas)
    config = _config(args, base=store.manifest.get("config"))
    model = ocdwrap.OCDModel(_model(args), store.layer, config)
    given = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    fit_args = ocdwrap.FitArgs(**{k: v for k, v in given.items() if v is not None})
    if accelerator is not None:
        model.to(accelerator.device)
    report = ocdwrap.fit(
        model, store, fit_args, accelerator=accelerator, checkpoint_dir=args.checkpoint_dir
    )
    if accelerator is None or accelerator.is_main_process:
        model.save_pretrained(args.out, overwrite=args.overwrite)
        print(
            f"fitted {report.steps} steps on {report.samples:,} samples in {report.seconds:.1f} s "
            f"(final loss {report.final_loss:.4f}); adapter saved to {args.out}"
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import ocdwrap

    base = _model(args)
    data = load_object(args.data)
    loss = _loss(args.loss, base)
    model = ocdwrap.OCDModel.from_pretrained(base, args.adapter)
    results: dict[str, Any] = {}
    for mode in args.modes.split(","):
        draws = args.num_draws if mode == "ocd" else 1
        res = ocdwrap.evaluate_ocd(
            model, data, loss, mode=mode, num_draws=draws, seed=args.seed, task=args.task
        )
        results[mode if draws == 1 else f"ocd({draws})"] = res
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'':<10} {'loss':>10} {'accuracy':>10} {'n':>8}")
        for name, res in results.items():
            acc = f"{100 * res['accuracy']:.2f}%" if "accuracy" in res else "-"
            print(f"{name:<10} {res['loss']:>10.4f} {acc:>10} {res['n']:>8}")
    return 0


def cmd_headroom(args: argparse.Namespace) -> int:
    import ocdwrap

    base = _model(args)
    data = load_object(args.data)
    loss = _loss(args.loss, base)
    if args.adapter:  # the overfit settings a saved adapter was collected with
        model = ocdwrap.OCDModel.from_pretrained(base, args.adapter)
    else:
        calibration = load_object(args.calibration) if args.calibration else data
        model = ocdwrap.wrap(
            base, layer=args.layer, config=_config(args), calibration=calibration, loss_fn=loss
        )
    report = ocdwrap.headroom(
        model,
        data,
        loss,
        max_samples=args.max_samples,
        train_loader=load_object(args.train_data) if args.train_data else None,
        max_train_samples=args.max_train_samples,
        task=args.task,
        folds=args.folds,
        mixture_classes=args.mixture_classes,
        seed=args.seed,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import ocdwrap

    base = _model(args)
    data, train = load_object(args.data), load_object(args.train_data)
    loss = _loss(args.loss, base)
    calibration = load_object(args.calibration) if args.calibration else data
    model = ocdwrap.wrap(
        base, layer=args.layer, config=_config(args), calibration=calibration, loss_fn=loss
    )
    fit = {k: getattr(args, k) for k in ("steps", "batch_size", "lr") if getattr(args, k)}
    generators = _named_objects(args.generator, "--generator")
    metrics = _named_objects(args.metric, "--metric")
    comparison = ocdwrap.compare(
        model,
        train,
        data,
        loss,
        out_dir=args.out,
        rows=args.rows.split(",") if args.rows else None,
        num_draws=args.num_draws,
        train_fn=load_object(args.train_fn, call=False) if args.train_fn else None,
        task=None if args.task == "auto" else args.task,
        seed=args.seed,
        progress=not args.json,
        fit_args=ocdwrap.FitArgs(seed=args.seed, **fit),
        overwrite=args.overwrite,
        resamples=args.resamples,
        generators=generators or None,
        metrics=metrics or None,
        features=load_object(args.features, call=False) if args.features else None,
    )
    if args.plot:
        comparison.plot(args.plot)
    print(json.dumps(comparison.to_dict(), indent=2) if args.json else comparison)
    return 0


def _named_objects(items: list[str] | None, option: str) -> dict[str, Any]:
    """``NAME=import.path`` items -> {NAME: the object} (a class or factory is called with no
    arguments, as for --model)."""
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(
                f"{option} takes NAME=import.path (e.g. {option} mine=my_generators.py:Mine), "
                f"got {item!r}."
            )
        if name in out:
            raise ValueError(f"{option} names {name!r} twice; give each one its own name.")
        out[name] = load_object(path)
    return out


# --- the parser -----------------------------------------------------------------------------------


def _compare_parser(sub: Any, common: Callable, configurable: Callable) -> None:
    """The ``compare`` subcommand's options."""
    cp = sub.add_parser(
        "compare", help="OCD against every control on labelled eval data (docs/compare.md)"
    )
    common(cp, data=True)
    configurable(cp)
    cp.add_argument("--train-data", required=True, help="import path of the training loader")
    cp.add_argument("--layer", default="auto", help="target module name, or auto (default)")
    cp.add_argument("--calibration", help="import path of calibration data for --layer auto")
    cp.add_argument("--out", required=True, help="directory of the collection and comparison.json")
    cp.add_argument("--rows", help="comma-separated rows (default: all); base and overfit always")
    cp.add_argument("--num-draws", type=int, default=5, help="draws of the ocd_k row")
    cp.add_argument("--train-fn", help="import path of train_fn(base_copy, seconds)")
    cp.add_argument(
        "--generator",
        action="append",
        metavar="NAME=PATH",
        help="a generator of yours scored as row NAME: import path of the object, or of a class "
        "or factory called with no arguments (repeatable)",
    )
    cp.add_argument(
        "--metric",
        action="append",
        metavar="NAME=PATH",
        help="an extra metric: import path of an ocdwrap.compare.Metric, or of a factory "
        "returning one (repeatable)",
    )
    cp.add_argument(
        "--features",
        help="import path of features(inputs) -> (B, d), the nearest row's distance space",
    )
    cp.add_argument("--steps", type=int, help="FitArgs.steps of the generators (default 2000)")
    cp.add_argument("--batch-size", type=int, help="FitArgs.batch_size (default 128)")
    cp.add_argument("--lr", type=float, help="FitArgs.lr (default 1e-4)")
    cp.add_argument("--task", default="auto", choices=["auto", "classification", "regression"])
    cp.add_argument("--seed", type=int, default=0)
    cp.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples")
    cp.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    cp.add_argument("--plot", help="also draw the shares to this PNG (needs matplotlib)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)


def _common(q: argparse.ArgumentParser, data: bool) -> None:
    q.add_argument("--model", required=True, help="import path of the trained base model")
    q.add_argument("--device", help="move the model there first (default: where it is)")
    if data:
        q.add_argument("--data", required=True, help="import path of the data loader")
        q.add_argument(
            "--loss",
            default="cross_entropy",
            help="cross_entropy (default), mse, hf, or an import path of loss_fn(pred, target)",
        )


def _configurable(q: argparse.ArgumentParser) -> None:
    q.add_argument("--config", help="a JSON file of OCDConfig fields")
    q.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="OCDConfig fields to override")


def _collect_parser(sub: Any) -> None:
    col = sub.add_parser(
        "collect", help="overfit the layer on every training sample, store the deltas"
    )
    _common(col, data=True)
    _configurable(col)
    col.add_argument("--layer", default="auto", help="target module name, or auto (default)")
    col.add_argument("--calibration", help="import path of calibration data for --layer auto")
    col.add_argument("--out", required=True, help="collection directory")
    col.add_argument("--max-samples", type=int)
    col.add_argument("--shard-size", type=int, default=4096, help="samples per shard")
    col.add_argument("--overwrite", action="store_true")
    col.set_defaults(func=cmd_collect)


def _fit_parser(sub: Any) -> None:
    fit = sub.add_parser("fit", help="fit the hypernetwork on a collection, save the adapter")
    _common(fit, data=False)
    _configurable(fit)
    fit.add_argument("--deltas", required=True, help="collection directory")
    fit.add_argument("--out", required=True, help="adapter directory")
    fit.add_argument("--steps", type=int, help="FitArgs.steps (default 2000)")
    fit.add_argument("--batch-size", type=int, help="FitArgs.batch_size (default 128)")
    fit.add_argument("--lr", type=float, help="FitArgs.lr (default 1e-4)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--checkpoint-dir", help="resumable checkpoints (single process)")
    fit.add_argument("--overwrite", action="store_true", help="replace an adapter in --out")
    fit.set_defaults(func=cmd_fit)


def _evaluate_parser(sub: Any) -> None:
    ev = sub.add_parser("evaluate", help="score base / OCD / overfit-on-test on a data loader")
    _common(ev, data=True)
    ev.add_argument("--adapter", required=True)
    ev.add_argument("--modes", default="base,ocd", help="comma-separated: base, ocd, overfit")
    ev.add_argument("--num-draws", type=int, default=1, help="OCD(K): draws averaged per input")
    ev.add_argument("--task", default="classification", choices=["classification", "regression"])
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_evaluate)


def _headroom_parser(sub: Any) -> None:
    hr = sub.add_parser(
        "headroom", help="before any collection: how much of the overfit gain can OCD capture?"
    )
    _common(hr, data=True)
    _configurable(hr)
    hr.add_argument("--layer", default="auto", help="target module name, or auto (default)")
    hr.add_argument("--calibration", help="import path of calibration data for --layer auto")
    hr.add_argument("--adapter", help="take the layer and overfit settings of a saved adapter")
    hr.add_argument("--train-data", help="fit the probe on this loader (default: cross-fitted)")
    hr.add_argument("--max-samples", type=int)
    hr.add_argument("--max-train-samples", type=int)
    hr.add_argument("--task", default="auto", choices=["auto", "classification", "regression"])
    hr.add_argument("--folds", type=int, default=5, help="cross-fitting folds of the probe")
    hr.add_argument("--mixture-classes", type=int, default=10, help="0 skips probe_mixture")
    hr.add_argument("--seed", type=int, default=0)
    hr.add_argument("--json", action="store_true")
    hr.set_defaults(func=cmd_headroom)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ocdwrap",
        description="OCD (Lutati & Wolf, ICLR 2023) on any PyTorch model: inspect, collect, fit, evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what an adapter / collection / fit checkpoint holds")
    info.add_argument("directory")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)
    for add in (_collect_parser, _fit_parser, _evaluate_parser, _headroom_parser):
        add(sub)
    _compare_parser(sub, _common, _configurable)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ocdwrap`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, TypeError, OCDError) as e:
        print(f"ocdwrap {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
