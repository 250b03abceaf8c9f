"""The benchmarks' own controls, beyond the rows ``ocdwrap.compare`` computes.

``ocdwrap.compare`` owns the shared rows (the nearest neighbour, the own-label overfit, the
compute-matched base among them); what is left here is what only the paper's tables have:

* :class:`Agreement`: how close a generator's deltas are to the overfit-on-test ones;
* :func:`overfit_all_layers`: every parameter overfitted per test sample, vectorized with
  ``torch.func``;
* :func:`alternative_layer`: the paper's "alternative layer" ablation's layer;
* :func:`truncate` and :func:`rank_energy`: how much of an overfit delta a rank-r generator can
  hold (the "overfit on test, truncated to rank r" bound of the low-rank benchmarks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

import ocdwrap
from ocdwrap.batches import read_output, split_batch, to_device

from .scoring import Task, evaluate_predictions


def _spec_matrix(spec: Any) -> torch.Tensor:
    """(B, out * in...) matrices of a delta spec."""
    full = spec.full()
    return full.reshape(full.shape[0], -1).float()


class Agreement:
    """How close generated deltas are to the overfit-on-test ones (true labels), per test sample.

    For the first ``max_samples`` test samples it keeps the true delta, the conditioning and
    whether the base model is right; :meth:`score` compares a generator's deltas with them:
    mean cosine (all samples, base-correct, base-wrong) and the median norm ratio.
    """

    def __init__(
        self, model: ocdwrap.OCDModel, test_loader: Iterable, task: Task, max_samples: int
    ) -> None:
        self.items: list[tuple[Any, Any, Any, torch.Tensor, torch.Tensor | None, int]] = []
        n = 0
        for batch in test_loader:
            if n >= max_samples:
                break
            x, y = split_batch(batch)
            x, y = to_device(x, model.device), to_device(y, model.device)
            take = min(int(y.shape[0]), max_samples - n)
            x, y = x[:take], y[:take]
            res = ocdwrap.overfit_batch(model, x, y, task.loss_fn)
            correct = None
            if task.kind == "classification":
                with torch.no_grad(), model.disable_adapter():
                    correct = read_output(model(x)).argmax(-1) == y
            self.items.append((x, y, res.cond, res.delta.reshape(take, -1).float(), correct, n))
            n += take

    @torch.no_grad()
    def score(self, spec_fn: Callable[[Any, Any, Any, int], Any]) -> dict[str, float]:
        """``spec_fn(x, y, cond, start)`` gives the deltas of test samples ``start`` onwards."""
        cos, ratio, right = [], [], []
        for x, y, cond, true, correct, start in self.items:
            gen = _spec_matrix(spec_fn(x, y, cond, start).to(true.device))
            cos.append(torch.nn.functional.cosine_similarity(gen, true, dim=1, eps=1e-30))
            ratio.append(gen.norm(dim=1) / true.norm(dim=1).clamp_min(1e-30))
            if correct is not None:
                right.append(correct)
        c = torch.cat(cos)
        out = {
            "cos": float(c.mean()),
            "abs_cos": float(c.abs().mean()),
            "norm_ratio_median": float(torch.cat(ratio).median()),
            "n": len(c),
        }
        if right:
            r = torch.cat(right)
            out["cos_base_right"] = float(c[r].mean()) if r.any() else float("nan")
            out["cos_base_wrong"] = float(c[~r].mean()) if (~r).any() else float("nan")
            out["n_base_wrong"] = int((~r).sum())
        return out


def overfit_all_layers(
    base: nn.Module,
    test_loader: Iterable,
    task: Task,
    *,
    lr: float = 5e-4,
    steps: int = 3,
    chunk: int = 256,
    max_samples: int | None = None,
    device: str = "cpu",
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> dict[str, float]:
    """Every parameter of ``base`` overfitted on each test sample alone (true label), Adam.

    Vectorized over samples with ``torch.func.vmap(grad(...))`` on a ``functional_call`` of a
    copy of ``base`` in eval mode: each sample has its own parameter copy and Adam state.
    ``chunk`` samples at a time (memory: 4 x chunk x parameters floats).
    """
    from torch.func import functional_call, grad, vmap

    module = copy.deepcopy(base).to(device).eval()
    params = {k: p.detach() for k, p in module.named_parameters()}
    buffers = {k: b.detach() for k, b in module.named_buffers()}

    def one_out(p: dict, x: torch.Tensor) -> torch.Tensor:
        return read_output(functional_call(module, (p, buffers), (x.unsqueeze(0),))).squeeze(0)

    def one_loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task.loss_fn(one_out(p, x).unsqueeze(0), y.unsqueeze(0)).sum()

    grads = vmap(grad(one_loss))
    forward = vmap(one_out)
    b1, b2 = betas
    seen = 0

    def predict(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        preds = []
        for s in range(0, x.shape[0], chunk):
            xb, yb = x[s : s + chunk], y[s : s + chunk]
            B = xb.shape[0]
            p = {k: v.unsqueeze(0).repeat(B, *([1] * v.dim())) for k, v in params.items()}
            m = {k: torch.zeros_like(v) for k, v in p.items()}
            v2 = {k: torch.zeros_like(v) for k, v in p.items()}
            for t in range(1, steps + 1):
                with torch.enable_grad():
                    g = grads(p, xb, yb)
                for k in p:
                    m[k].mul_(b1).add_(g[k], alpha=1 - b1)
                    v2[k].mul_(b2).addcmul_(g[k], g[k], value=1 - b2)
                    denom = (v2[k] / (1 - b2**t)).sqrt_().add_(eps)
                    p[k] = p[k] - (lr / (1 - b1**t)) * m[k] / denom
            preds.append(forward(p, xb))
        return torch.cat(preds)

    def limited() -> Iterable:
        nonlocal seen
        for batch in test_loader:
            x, y = split_batch(batch)
            if max_samples is not None:
                if seen >= max_samples:
                    return
                x, y = x[: max_samples - seen], y[: max_samples - seen]
            seen += int(y.shape[0])
            yield x, y

    return evaluate_predictions(predict, limited(), task, device)


def alternative_layer(
    base: nn.Module,
    main_layer: str,
    calibration: Iterable,
    task: Task,
    *,
    linear_only: bool,
    seed: int = 0,
    device: str = "cpu",
) -> tuple[str, dict[str, Any]]:
    """The highest-ranked layer other than ``main_layer`` by :func:`ocdwrap.select_layer`.

    ``linear_only`` restricts the candidates to nn.Linear layers (the rank-one
    parameterisation needs a Linear on vector inputs).
    """
    cands = None
    if linear_only:
        cands = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n]
    scores = ocdwrap.select_layer(
        base, calibration, task.loss_fn, candidates=cands, seed=seed, device=device, progress=False
    )
    alt = next(name for name, _ in scores.ranking if name != main_layer)
    return alt, {
        "ranking": scores.to_list(),
        "best": scores.best,
        "second": scores.second,
        "main_layer_rank": [n for n, _ in scores.ranking].index(main_layer) + 1
        if main_layer in scores.scores
        else None,
        "chosen_alternative": alt,
        "seconds": scores.seconds,
    }


def truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Each matrix of ``delta`` (B, out, in) replaced by its best rank-``rank`` approximation."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]


def rank_energy(delta: torch.Tensor, ranks: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict[str, float]:
    """Mean share of each delta's squared Frobenius norm that its top r singular values hold."""
    s2 = torch.linalg.svdvals(delta).pow(2)
    share = s2.cumsum(-1) / s2.sum(-1, keepdim=True).clamp_min(1e-30)
    return {str(r): float(share[:, min(r, share.shape[1]) - 1].mean()) for r in ranks}
