"""Can the spread between OCD's generated networks tell when a prediction is wrong?

    python -m examples.uncertainty                              # about 10-15 minutes on 2 cores
    python -m examples.uncertainty --plots docs/img --json runs/uncertainty.json
    python -m examples.uncertainty --smoke                      # tiny sizes, seconds

Runs the quickstart pipeline (LeNet5 on MNIST, fc2, rank-one deltas, ``ocdwrap.compare`` with every
control; see ``examples.quickstart``), then, on the 10k test images:

* the AUROC, for detecting misclassified samples, of three scores: the OCD(K) ensemble's
  spread between draws, the base model's 1 - max softmax probability, and 1 - the OCD(K)
  ensemble's max mean probability; against OCD(K)'s own errors and against the base model's;
* whether the spread adds anything once the base confidence is known: a logistic model on
  log(1 - MSP) alone vs with log(spread), both cross-validated, and the paired bootstrap
  interval of the difference in AUROC;
* the expected calibration error of base and OCD(K);
* how close the generated delta is to the delta obtained by overfitting each test input with its
  true label (cosine similarity), next to a shuffled control (the overfit delta of another input).

``--plots DIR`` writes compare.png, layer_scores.png, fit_losses.png, deltas.png, results.png,
reliability.png and uncertainty.png (see docs/figures.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import ocdwrap
from examples import quickstart  # its steps (train, compare, report) are reused
from examples.data import tensor_loader
from ocdwrap.analysis import plots
from ocdwrap.analysis.uncertainty import misclassification_report

log = quickstart.log
CE = quickstart.CE


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--optimizer", choices=["adam", "sgd"], default="adam", help="per-sample overfit optimizer"
    )
    p.add_argument(
        "--train-samples", type=int, default=20000, help="training samples to overfit and fit on"
    )
    p.add_argument("--fit-steps", type=int, default=3000, help="hypernetwork training steps")
    p.add_argument(
        "--max-epochs", type=int, default=30, help="base training epochs at most (early stopping)"
    )
    p.add_argument("--draws", type=int, default=5, help="ensemble size K of OCD(K)")
    p.add_argument("--bins", type=int, default=15, help="confidence bins of the ECE")
    p.add_argument(
        "--resamples", type=int, default=1000, help="bootstrap resamples of the AUROC intervals"
    )
    p.add_argument(
        "--layer-draws", type=int, default=32, help="weight perturbations per layer (layer scores)"
    )
    p.add_argument(
        "--delta-samples",
        type=int,
        default=1000,
        help="test inputs whose generated and overfit deltas are compared",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--workdir", default=None, help="where deltas go (default: a temporary directory)"
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plots", default=None, metavar="DIR", help="write the figures (PNG) here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    quickstart.add_smoke_argument(p)
    args = p.parse_args(argv)
    if args.smoke:  # the quickstart's smoke sizes, and few delta comparisons and bootstraps
        args = quickstart.smoke_sizes(args)
        args.delta_samples, args.bins, args.resamples, args.layer_draws = 64, 5, 100, 8
    return args


def delta_cosines(pipe: quickstart.Pipeline, n: int, seed: int) -> dict[str, float]:
    """Cosine of generated vs true-label overfit deltas on ``n`` test inputs, and a shuffled control."""
    xte, yte = pipe.data["test"]
    model = pipe.ocd_model("rank1")
    gen = torch.Generator(device=model.device).manual_seed(seed)
    n = min(n, len(xte))
    try:
        parts = [
            plots.delta_comparison(
                model, xte[i : min(i + 250, n)], yte[i : min(i + 250, n)], CE, rng=gen
            )
            for i in range(0, n, 250)
        ]
    finally:
        model.unload()
    generated = torch.cat([p.generated for p in parts]).flatten(1)
    overfit = torch.cat([p.overfit for p in parts]).flatten(1)
    cos = torch.cat([p.cosine for p in parts])
    perm = torch.randperm(len(cos), generator=torch.Generator().manual_seed(seed))
    shuffled = torch.nn.functional.cosine_similarity(generated, overfit[perm], dim=1)
    same = yte[: len(cos)] == yte[: len(cos)][perm]
    return {
        "n": len(cos),
        "mean": float(cos.mean()),
        "median": float(cos.median()),
        "q10": float(cos.quantile(0.1)),
        "q90": float(cos.quantile(0.9)),
        "shuffled_mean": float(shuffled.mean()),
        "shuffled_same_label_mean": float(shuffled[same].mean()) if same.any() else float("nan"),
        "shuffled_other_label_mean": float(shuffled[~same].mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    qargs = argparse.Namespace(**{**vars(args), "delta": "rank1", "paper": False})
    pipe = quickstart.run(qargs)
    t0 = time.perf_counter()
    xva, yva = pipe.data["val"]
    xte, yte = pipe.data["test"]
    test = tensor_loader(xte, yte, 1000)

    log("5/5 layer selection scores (for the figure), uncertainty and delta similarity")
    scores = ocdwrap.select_layer(
        pipe.base,
        tensor_loader(xva[:256], yva[:256], 256),
        CE,
        draws=args.layer_draws,
        seed=args.seed,
        progress=False,
    )
    model = pipe.ocd_model("rank1")
    try:
        rep = misclassification_report(
            model,
            test,
            num_draws=args.draws,
            seed=args.seed,
            n_bins=args.bins,
            resamples=args.resamples,
        )
    finally:
        model.unload()
    cosines = delta_cosines(pipe, args.delta_samples, args.seed)
    seconds_uncertainty = time.perf_counter() - t0

    quickstart.print_report(pipe, qargs)  # the comparison and the paper's Table 1
    print(f"\nMisclassification detection on the {rep.n} MNIST test images, seed {args.seed}:\n")
    print(rep.table())
    verdict = "adds" if rep.spread_adds_information else "does not add"
    print(
        f"\nThe spread {verdict} information over the base model's confidence for OCD({args.draws})'s "
        f"errors (cross-validated AUROC difference {rep.added_value['ocd_wrong']['difference']:+.4f}, "
        f"95 % interval [{rep.added_value['ocd_wrong']['difference_low']:+.4f}, "
        f"{rep.added_value['ocd_wrong']['difference_high']:+.4f}])."
    )
    print(
        f"\nGenerated vs true-label overfit delta on {cosines['n']} test inputs: cosine mean "
        f"{cosines['mean']:.3f} (median {cosines['median']:.3f}, 10-90 % {cosines['q10']:.3f}-"
        f"{cosines['q90']:.3f}); against another input's overfit delta: {cosines['shuffled_mean']:.3f} "
        f"(same label {cosines['shuffled_same_label_mean']:.3f}, other label "
        f"{cosines['shuffled_other_label_mean']:.3f})."
    )
    print(
        f"Layer selection (gaussian, {scores.draws} draws, {scores.samples} samples): {scores.best}"
    )

    result = {
        "command": " ".join(["python -m examples.uncertainty", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, "
        f"threads: {torch.get_num_threads()}",
        "uncertainty": rep.to_dict(),
        "delta_cosine": cosines,
        "layer_scores": scores.to_dict(),
        "rows": {k: {"loss": v["loss"], "accuracy": v["accuracy"]} for k, v in pipe.rows.items()},
        "verdict": pipe.comparison.verdict,
        "settings": {
            **vars(args),
            "train_samples_used": pipe.n_train,
            "base_epochs": pipe.train_result.epochs_run,
        },
        "seconds": {**pipe.timings, "pipeline": pipe.total, "uncertainty": seconds_uncertainty},
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plots:
        paths = quickstart.write_plots(args.plots, pipe, seed=args.seed)
        paths.append(os.path.join(args.plots, "layer_scores.png"))
        plots.plot_layer_scores(scores, reference="fc2", path=paths[-1])
        paths.append(os.path.join(args.plots, "reliability.png"))
        plots.plot_reliability(
            rep,
            n_bins=args.bins,
            path=paths[-1],
            title=f"MNIST test set, LeNet5 base vs OCD({args.draws}), {args.bins} bins",
        )
        paths.append(os.path.join(args.plots, "uncertainty.png"))
        plots.plot_uncertainty(
            rep,
            path=paths[-1],
            title=f"Is OCD({args.draws})'s spread a wrong-prediction detector? MNIST, {rep.n} test images",
        )
        for path in paths:
            log(f"   wrote {path}")
    return result


if __name__ == "__main__":
    main()
