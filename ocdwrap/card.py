"""An adapter's model card: the ``README.md`` that :meth:`OCDModel.save_pretrained` writes.

A Hugging Face style card: YAML front matter (``library_name: ocdwrap``, the base model where
known, tags) and what a reader needs to judge the adapter: the base model and layer, the delta
parameterisation and generator, the ocdwrap version, the fit that trained it, and the
``compare`` table and verdict and the ``headroom`` report when they were computed on this
model. :func:`read_card` reads the front matter back (``ocdwrap info`` shows it).
"""

from __future__ import annotations

import json
import os
from typing import Any

CARD_NAME = "README.md"
CARD_MARK = "library_name: ocdwrap"  # a card ocdwrap wrote (and may replace)


def base_model_name(base: Any) -> str | None:
    """The base model's name or path where the model records one (Hugging Face models)."""
    for owner in (base, getattr(base, "config", None)):
        for attr in ("name_or_path", "_name_or_path"):
            name = getattr(owner, attr, None)
            if isinstance(name, str) and name:
                return name
    return None


def is_ours(path: str) -> bool:
    """Whether ``path`` is a card ocdwrap wrote (a user's own README is never replaced)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(2000)
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("---") and CARD_MARK in head.split("---", 2)[1]


def _sampling(s: Any) -> str:
    draws = f"{s.num_draws} draw(s)" + (f", seed {s.seed}" if s.seed is not None else "")
    return f"{s.sampler}, {s.sampling_steps} steps, {draws}"


def model_card(model: Any, version: str) -> str:
    """The card of ``model`` (an :class:`~ocdwrap.model.OCDModel` with a hypernetwork)."""
    cfg = model.config
    base = type(model.base_model).__name__
    name = base_model_name(model.base_model)
    shape = " x ".join(str(s) for s in model.weight_shape)
    front = ["---", CARD_MARK, f"library_version: {version}"]
    front += [f"base_model: {json.dumps(name)}"] if name else []
    front += ["tags:", "- ocdwrap", "- ocd", "- hypernetwork", "---", ""]
    rows = [
        ("base model", f"`{base}`" + (f" (`{name}`)" if name else "")),
        ("layer", f"`{model.layer_name}` ({model.layer_kind}, weight {shape})"),
        ("base fingerprint", f"`{model.layer_fingerprint()}`"),
        ("delta", cfg.delta + (f" (rank {cfg.delta_rank})" if cfg.delta == "lowrank" else "")),
        ("generator", f"{cfg.generator}, scale {cfg.scale}"),
        ("sampling", _sampling(model.sampling_config)),
        (
            "per-sample overfit",
            f"{cfg.overfit_optimizer} lr {cfg.overfit_lr} x {cfg.overfit_steps} steps",
        ),
        ("ocdwrap", version),
    ]
    lines = front + [
        f"# OCD adapter for `{base}`, layer `{model.layer_name}`",
        "",
        "Per-input weights for one layer, generated from each input by a conditional diffusion "
        "model (OCD: Lutati & Wolf, ICLR 2023), made with ocdwrap. The base model is not part of "
        "the adapter: load it first, then",
        "",
        "```python",
        "import ocdwrap",
        'model = ocdwrap.OCDModel.from_pretrained(base, "path/to/this/adapter")',
        "```",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
    ]
    fit = getattr(model, "fit_report", None)
    if fit is not None:
        lines += [
            "## Fit",
            "",
            f"{fit.steps:,} steps on {fit.samples:,} collected samples in {fit.seconds:.0f} s; "
            f"final denoising loss {fit.final_loss:.4g}"
            + (f" (resumed from step {fit.resumed_from})" if fit.resumed_from else "")
            + (f"; {fit.skipped_steps} non-finite steps skipped" if fit.skipped_steps else "")
            + ".",
            "",
        ]
    verdict = getattr(model, "compare_report", None)
    if verdict is not None:
        lines += [
            "## OCD against the controls on this model (`ocdwrap.compare`)",
            "",
            "```",
            str(verdict).rstrip(),
            "```",
            "",
        ]
    room = getattr(model, "headroom_report", None)
    if room is not None:
        lines += [
            "## Can OCD help on this model? (`ocdwrap.headroom`)",
            "",
            "```",
            str(room).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines)


def read_card(directory: str) -> dict[str, Any] | None:
    """The front matter of the card in ``directory`` (None when it has none), with its title."""
    path = os.path.join(directory, CARD_NAME)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.startswith("---"):
        return {"title": None, "sections": []}
    _, front, body = text.split("---", 2)
    found: dict[str, Any] = {}
    for line in front.splitlines():
        if ":" in line and not line.startswith(" ") and not line.startswith("-"):
            key, value = line.split(":", 1)
            value = value.strip()
            try:
                found[key.strip()] = json.loads(value) if value.startswith('"') else value
            except ValueError:
                found[key.strip()] = value
    titles = [line[2:] for line in body.splitlines() if line.startswith("# ")]
    found["title"] = titles[0] if titles else None
    found["sections"] = [line[3:] for line in body.splitlines() if line.startswith("## ")]
    return found
