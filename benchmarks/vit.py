"""Fashion-MNIST / a small vision transformer: the paper's Tiny-ImageNet / DeiT-B experiment,
on data and a model size that two CPU cores can train from scratch.

    python -m benchmarks.vit --json runs/vit.json                 # 3 seeds, both targets
    python -m benchmarks.vit --seeds 1 --json runs/vit_s1.json    # one seed per process, then
    python -m benchmarks.vit --merge runs/vit_s0.json runs/vit_s1.json --json runs/vit.json
    python -m benchmarks.vit --smoke

The paper puts OCD on a pretrained DeiT-B fine-tuned on Tiny-ImageNet (base 90.8 %, OCD(5)
92.0 %). Neither DeiT's weights nor Tiny-ImageNet can be reached offline here, so this runs the
same kind of network, trained from scratch, on Fashion-MNIST (Debian's ``dataset-fashion-mnist``:
55k train / 5k validation / 10k test, 28 x 28 grey, 10 classes): no pretraining, 28 x 28 inputs
instead of 64 x 64 (or upsampled 224 x 224), 10 classes instead of 200, ~0.14 M parameters
instead of 86 M.

The model is timm's ``VisionTransformer`` built from a config (``--dim 64 --depth 4 --heads 4
--mlp-ratio 2 --patch 7``: 7 x 7 patches, so 16 patch tokens and a class token, pre-norm
blocks, GELU MLPs, the class token read by the head: DeiT's architecture without its
distillation token). timm rather than torchvision's ``VisionTransformer``: torchvision's fixes
three input channels and its attention reads ``out_proj`` as a weight inside
``nn.MultiheadAttention`` without calling it, so a wrap of it is never reached; every Linear of
timm's blocks (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) is a module call, and the
model builds from keyword arguments with no weights to download. timm is in the ``bench`` and
``test`` extras.

Per seed: the ViT trained with Adam 1e-3, batch 128, early stopping on the validation split
(best weights kept), then two OCD targets, one table each:

* ``head`` (64 -> 10, a Linear on the class token, one vector per image: rank-one deltas, as
  the paper's DeiT experiment, which names no layer, would most naturally use);
* ``blocks.{depth-1}.attn.qkv`` (64 -> 192 inside the last block, a Linear applied to all 17
  tokens: its per-image delta is a sum over tokens, generated as ``delta="lowrank"`` with
  ``--delta-rank`` factor pairs). Not ``attn.proj`` or ``mlp.fc1/fc2`` of the last block: after
  the last attention only the class token reaches the head, so their deltas are rank one again
  (measured: top singular value 99.9999 % of the energy); ``qkv`` feeds the class token's
  attention over every token's key and value.

Each table: base, compute-matched base, OCD, OCD(K), global rho, regression generator, nearest
neighbour (pixel space), overfit on test with the base's own predicted label, overfit on test
(true label; the bound); the head table adds every layer overfitted per test image (a subset),
the qkv table the overfit delta truncated to rank ``--delta-rank`` (what a rank-r generator can
hold). Before any collection, ``ocdwrap.headroom`` on the validation split for each target.

CPU default, sized for two shared cores (an epoch of 20k images costs ~13 CPU-seconds, a fit
step ~0.04): the base trained on the first 20k training images (at most 12 epochs, patience 3),
the first 5k of them overfitted for each target, 1,500 fit steps (the other benchmarks: 3,000),
the first 2,000 test images scored (200 for the all-layers row), ``ocdwrap.headroom`` on 500
validation images. ``--train-images 0 --test-images 0`` uses all 55k / 10k.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
from torch import nn

import ocdwrap
from ocdwrap.generators import GlobalScale
from ocdwrap.layer import FullDelta

from . import cli, notes
from .controls import rank_energy, truncate
from .datasets import load_fashion_mnist, tensor_loader
from .experiment import (
    add_run,
    base_row,
    headroom_info,
    overfit_all_row,
    pixels,
    run_compare,
    table_rows,
    train_fn_for,
)
from .results import Metric, Results, Row, with_overfit_lr, write_json
from .scoring import Task, evaluate_with_deltas
from .timing import log, machine, peak_rss_mb, timed

MODULE = "benchmarks.vit"
HEAD = "head"
TARGETS = ("head", "qkv")

# paper: DeiT-B on Tiny-ImageNet (pretrained, another data set: context for the protocol only)
COMMON = table_rows(
    [
        "base", "compute_matched", "ocd", "ocd_k", "global", "regression", "nearest", "own_label",
        "probe", "overfit",
    ],
    layer="the layer",
    space="pixel space",
    labels={
        "base": "base ViT (early stopping on val split)",
        "own_label": "overfit on test with the base's own predicted label (no labels)",
        "probe": "overfit on test towards a probe's prediction (no test labels)",
    },
    paper={"base": {"acc": "90.8"}, "ocd_k": {"acc": "92.0"}},
)  # fmt: skip
METRICS = [Metric("loss", "test CE", ".4f"), Metric("acc", "test acc %", ".2f")]
OTHER_ROWS = ("compute_matched", "global", "regression", "nearest", "own_label", "probe")


def qkv_layer(depth: int) -> str:
    return f"blocks.{depth - 1}.attn.qkv"


def rows_for(target: str, args: Any) -> list[Row]:
    extra = (
        [Row("overfit_all", "overfit ALL layers on test (Adam 5e-4 × 3; subset)")]
        if target == "head"
        else [Row("overfit_rank", f"overfit on test, delta truncated to rank {args.delta_rank}")]
    )
    return with_overfit_lr(COMMON + extra, args.overfit_lr)


def title_for(target: str, args: Any) -> str:
    if target == "head":
        return f"Fashion-MNIST / ViT, OCD on head ({args.dim}→10, class token: rank one)"
    tokens = (28 // args.patch) ** 2 + 1
    return (
        f"Fashion-MNIST / ViT, OCD on {qkv_layer(args.depth)} ({args.dim}→{3 * args.dim} on "
        f"{tokens} tokens: rank {args.delta_rank})"
    )


def make_vit(args: Any) -> nn.Module:
    """timm's VisionTransformer for 28 x 28 grey images (random init; nothing downloaded)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover - the bench/test extras install it
        raise SystemExit(
            "benchmarks.vit needs timm: pip install 'timm>=1.0' (in the bench and test extras)"
        ) from e
    return VisionTransformer(
        img_size=28,
        patch_size=args.patch,
        in_chans=1,
        num_classes=10,
        embed_dim=args.dim,
        depth=args.depth,
        num_heads=args.heads,
        mlp_ratio=args.mlp_ratio,
        class_token=True,
        global_pool="token",
    )


def parse_args(argv: list[str] | None) -> Any:
    p = cli.base_parser(MODULE, __doc__)
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--dim", type=int, default=64, help="embedding width")
    p.add_argument("--depth", type=int, default=4, help="transformer blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--patch", type=int, default=7, help="patch side (28 must be a multiple)")
    p.add_argument("--delta-rank", type=int, default=4, help="factor pairs of the qkv deltas")
    p.add_argument(
        "--train-images", type=int, default=20000, help="base training images (0: all 55k)"
    )
    p.add_argument("--collect-images", type=int, default=5000, help="images overfitted")
    p.add_argument("--val-images", type=int, default=0, help="0: all 5,000")
    p.add_argument("--test-images", type=int, default=2000, help="the first N (0: all 10,000)")
    p.add_argument("--all-layers-samples", type=int, default=200)
    p.add_argument("--max-epochs", type=int, default=12)
    p.add_argument("--patience", type=int, default=3)
    p.set_defaults(headroom_samples=500)
    cli.add_merge_option(p, "targets")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds = args.seeds[:1]
        args.train_images, args.val_images, args.test_images = 512, 128, 64
        args.collect_images, args.all_layers_samples = 128, 4
        args.max_epochs, args.patience = 1, 1
        args.fit_steps = args.fit_steps or 10
        args.draws = 2
    if not args.paper:
        args.fit_steps = args.fit_steps or 1500
    if 28 % args.patch or args.delta_rank < 1:
        p.error("--patch must divide 28 and --delta-rank must be >= 1")
    if cli.merge_requested(p, args):
        return args
    return cli.resolve_defaults(args)


def _target_part(args: Any, seed: int, target: str, base: nn.Module, pristine: nn.Module,
                 data: dict, res: Results, workdir: str) -> None:  # fmt: skip
    """One target's rows for one seed (the base row is already in ``res``)."""
    dev, task = args.device, Task.classification()
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    n = min(args.collect_images or len(ytr), len(ytr))
    collect_loader = tensor_loader(xtr[:n], ytr[:n], 128)
    test = tensor_loader(xte, yte, 250)
    layer = HEAD if target == "head" else qkv_layer(args.depth)
    kw = {} if target == "head" else {"delta": "lowrank", "delta_rank": args.delta_rank}
    cfg = cli.ocd_config(args, **kw)
    fit, sampling = cli.fit_args(args, seed), cli.sampling_config(args, seed)
    t0 = time.perf_counter()
    headroom_info(
        res, seed, base, layer, cfg, tensor_loader(xva, yva, 250), task,
        max_samples=args.headroom_samples, train_loader=collect_loader,
    )  # fmt: skip
    if args.headroom_only:
        return
    train_fn, record = train_fn_for(
        tensor_loader(xtr, ytr, 128, shuffle=True, seed=seed + 1000), task, device=dev, seed=seed
    )
    run = run_compare(
        base, layer, cfg, collect_loader, test, task, os.path.join(workdir, f"s{seed}-{target}"),
        fit_args=fit, sampling=sampling, draws=args.draws, seed=seed, train_fn=train_fn,
        train_record=record, features=pixels, generators={"global": GlobalScale()},
        progress=args.progress, tag=target,
    )  # fmt: skip
    add_run(res, seed, run)
    if target == "head":
        overfit_all_row(
            res, seed, pristine, test, task, cfg, device=dev,
            max_samples=args.all_layers_samples or None, chunk=50,
        )  # fmt: skip
    else:
        rank_rows(args, seed, base, layer, cfg, test, task, res)
    res.info[seed]["part_s"] = time.perf_counter() - t0


def rank_rows(args: Any, seed: int, base: nn.Module, layer: str, cfg: ocdwrap.OCDConfig,
              test: Any, task: Task, res: Results) -> None:  # fmt: skip
    """The overfit-on-test delta truncated to rank r, and how much of each delta's energy its
    top singular values hold (on the first test batch)."""
    model = ocdwrap.wrap(base, layer=layer, config=cfg)
    try:

        def spec(x: torch.Tensor, y: torch.Tensor, p: int) -> FullDelta:
            d = ocdwrap.overfit_batch(model, x, y, task.loss_fn).delta
            return FullDelta(truncate(d.reshape(len(y), *model.weight_shape), args.delta_rank))

        row, seconds = timed(lambda: evaluate_with_deltas(model, test, task, spec))
        res.add(seed, "overfit_rank", row)
        x, y = next(iter(test))
        d = ocdwrap.overfit_batch(model, x, y, task.loss_fn).delta
        energy = rank_energy(d.reshape(len(y), *model.weight_shape))
        res.info[seed]["true_delta_rank_energy"] = energy
        log(f"[qkv] overfit on test, rank {args.delta_rank}: {row} ({seconds:.0f} s); "
            f"energy of the top r singular values: {energy}")  # fmt: skip
    finally:
        model.unload()


def table_notes(res: Results, args: Any, target: str) -> list[str]:
    out = notes.gap_notes(res, "loss", {}) + notes.gap_notes(res, "acc", {})
    keys = OTHER_ROWS + (("overfit_rank",) if target == "qkv" else ())
    out += notes.other_gaps_note(res, "acc", keys) + notes.other_gaps_note(res, "loss", keys)
    out += notes.compare_note(res)
    out += notes.training_notes(
        res,
        f"timm VisionTransformer (dim {args.dim}, depth {args.depth}, {args.heads} heads, "
        f"mlp ratio {args.mlp_ratio:g}, patch {args.patch}), Adam 1e-3, batch 128",
        f"patience {args.patience}, at most {args.max_epochs} epochs",
    )
    out += notes.ocd_note(res)
    out += notes.headroom_note(res)
    out += notes.agreement_note(res)
    energy = [
        i["true_delta_rank_energy"] for i in res.info.values() if "true_delta_rank_energy" in i
    ]
    if energy:
        out.append(
            "share of an overfit-on-test delta's energy in its top r singular values (first 250 "
            f"test images), per seed: {[{r: round(v, 3) for r, v in e.items()} for e in energy]}"
        )
    part = [round(i["part_s"]) for i in res.info.values() if "part_s" in i]
    base_s = [
        round(i["base_training"]["seconds"]) for i in res.info.values() if "base_training" in i
    ]
    out.append(
        f"time per seed: base training {base_s} s, this target's rows {part} s; "
        f"{args.collect_images or 'all'} training images overfitted, delta="
        f"{'rank1' if target == 'head' else f'lowrank (rank {args.delta_rank})'}, {args.fit_steps} "
        f"fit steps, K={args.draws}; all-layers row on the first {args.all_layers_samples} test images"
    )
    out.append(
        "paper columns: DeiT-B pretrained on ImageNet, fine-tuned on Tiny-ImageNet (200 classes), "
        "base 90.8 %, OCD(5) 92.0 %; here no pretraining, 28 × 28 grey inputs, 10 classes and "
        "0.14 M parameters: context for the protocol only"
    )
    return out


def make_part(args: Any, target: str) -> cli.Part:
    res = Results("vit", rows_for(target, args), METRICS)
    return cli.Part(
        target,
        res,
        title_for(target, args),
        lambda seed: None,
        lambda: table_notes(res, args, target),
    )


def load_data(args: Any) -> dict:
    data = load_fashion_mnist()
    limits = {"train": args.train_images, "val": args.val_images, "test": args.test_images}
    return {k: tuple(t[: limits[k] or None].to(args.device) for t in v) for k, v in data.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        merged = cli.merge_runs(
            args.merge, cli.command(MODULE, argv), benchmark="vit", parts_setting="targets",
            part_value=lambda name: name, make_part=make_part,
        )  # fmt: skip
        return cli.merge_main(args, merged)
    workdir = cli.setup(args)
    t0 = time.perf_counter()
    data = load_data(args)
    parts = {t: make_part(args, t) for t in args.targets}
    cmd = cli.command(MODULE, argv)
    out: dict[str, Any] = {
        "benchmark": "vit", "command": cmd, "settings": vars(args), "datasets": {},
    }  # fmt: skip

    def save() -> None:
        for t, part in parts.items():
            if part.res.per_seed:
                part.res.notes = part.notes()
                out["datasets"][t] = part.res.to_json(title=part.title, command=cmd)
        out["seconds"], out["peak_rss_mb"] = time.perf_counter() - t0, peak_rss_mb()
        write_json(args.json, out)

    task = Task.classification()
    (xtr, ytr), (xva, yva), (xte, yte) = data["train"], data["val"], data["test"]
    for seed in args.seeds:
        first = parts[args.targets[0]].res
        log(f"seed {seed}: training the ViT on {len(ytr)} images to convergence")
        torch.manual_seed(seed)
        base = make_vit(args)
        pristine = base_row(
            first, seed, base, (xtr, ytr), (xva, yva), tensor_loader(xte, yte, 250), task,
            batch_size=128, val_batch_size=250, max_epochs=args.max_epochs,
            patience=args.patience, device=args.device, progress=True,
        )  # fmt: skip
        for target, part in parts.items():
            if part.res is not first:
                part.res.add(seed, "base", first.per_seed[seed]["base"])
                part.res.info[seed] = {"base_training": first.info[seed]["base_training"]}
            _target_part(args, seed, target, base, copy.deepcopy(pristine), data, part.res, workdir)
            save()
    minutes = (time.perf_counter() - t0) / 60
    for part in parts.values():
        print(part.res.report(f"{part.title}; {machine(args.device)}; {minutes:.1f} min\n`{cmd}`"))
    return out


if __name__ == "__main__":
    main()
