"""Tests of the loss-entropy layer selection (ocdwrap/select.py). Tiny local models only."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from ocdwrap.errors import EmptyDataError, LayerNotFoundError, OCDError
from ocdwrap.select import (
    LayerScores,
    _draw_weights,
    kde_entropy,
    list_candidates,
    select_layer,
)

CE = nn.CrossEntropyLoss(reduction="none")


class DeadBranch(nn.Module):
    """Two linear layers feed the head; the output of ``dead`` is multiplied by zero."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.dead = nn.Linear(6, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.inp(x)) + 0.0 * self.dead(x))


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.drop(x.flatten(1)))


class DataDependent(nn.Module):
    """Python control flow on tensor values: vmap cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > -1e9:
            h = torch.tanh(h)
        return self.b(h)


def _tab_data(
    n_batches: int = 2, b: int = 8, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(b, 6, generator=g), torch.randint(0, 3, (b,), generator=g))
        for _ in range(n_batches)
    ]


def _img_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g))]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)
    )


def _run(model, data, **kw) -> LayerScores:
    kw.setdefault("draws", 8)
    kw.setdefault("progress", False)
    return select_layer(model, data, CE, **kw)


# --- the entropy estimate ----------------------------------------------------------------------


def test_kde_entropy_of_a_gaussian_and_of_a_constant() -> None:
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(2, 2000, generator=g, dtype=torch.float64)
    assert torch.allclose(
        kde_entropy(x),
        torch.full((2,), 0.5 * math.log(2 * math.pi * math.e * 9), dtype=torch.float64),
        atol=0.1,
    )
    const = kde_entropy(torch.zeros(5, 16))
    assert torch.isfinite(const).all() and (const < -12).all()
    assert torch.isfinite(kde_entropy(torch.full((1, 16), 1e4))).all()


# --- scores ------------------------------------------------------------------------------------


def test_every_candidate_is_scored_and_ranked() -> None:
    model = SmallConv()
    scores = _run(model, _img_data())
    assert {n for n, _ in scores.ranking} == {"conv1", "conv2", "fc"}
    values = [s for _, s in scores.ranking]
    assert values == sorted(values, reverse=True) and all(math.isfinite(v) for v in values)
    assert scores.best == scores.ranking[0][0] and scores.second == scores.ranking[1][0]
    assert scores.to_list() == [[n, s] for n, s in scores.ranking]
    layer = {s.name: s for s in scores.layers}["conv2"]
    assert layer.weight_shape == (4, 4, 3, 3) and layer.num_params == 144 and layer.loss_std > 0
    assert scores.samples == 6 and scores.draws == 8 and scores.seconds > 0
    text = str(scores)
    assert "| rank | layer |" in text and "conv1" in text and repr(scores) == text


def test_a_layer_that_cannot_change_the_loss_scores_lowest() -> None:
    for perturbation in ("gaussian", "reinit"):
        scores = _run(DeadBranch(), _tab_data(), perturbation=perturbation)
        assert scores.ranking[-1][0] == "dead"
        dead = scores.layers[-1]
        assert dead.loss_std == 0.0
        assert dead.score < scores.layers[-2].score - 100


def test_deterministic_under_a_seed_and_seeds_differ() -> None:
    model, data = _mlp(), _tab_data()
    a, b = _run(model, data, seed=3), _run(model, data, seed=3)
    assert a.ranking == b.ranking
    c = _run(model, data, seed=4)
    assert a.scores != c.scores


def test_filters() -> None:
    model = SmallConv()
    assert list_candidates(model) == ["conv1", "conv2", "fc"]
    assert list_candidates(model, candidates="conv*") == ["conv1", "conv2"]
    assert list_candidates(model, candidates=["fc", "conv1"]) == ["conv1", "fc"]
    assert list_candidates(model, exclude=["conv?"]) == ["fc"]
    assert list_candidates(model, min_params=100) == ["conv2", "fc"]
    assert list_candidates(model, max_params=144) == ["conv1", "conv2"]
    full = _run(model, _img_data())
    only = _run(model, _img_data(), candidates="conv2")
    assert only.ranking == [("conv2", full.scores["conv2"])]  # per-layer seed: same draws


def test_no_candidates_raises_with_the_layer_list() -> None:
    with pytest.raises(
        LayerNotFoundError, match=r"exclude=.*conv1 \(Conv2d, 4x1x3x3\).*fc \(Linear"
    ):
        _run(SmallConv(), _img_data(), exclude="*")
    with pytest.raises(LayerNotFoundError, match="no Linear or Conv2d"):
        _run(nn.Sequential(nn.ReLU()), _tab_data())


def test_empty_data_raises() -> None:
    with pytest.raises(EmptyDataError, match="no calibration samples"):
        _run(_mlp(), [])
    with pytest.raises(OCDError):
        _run(_mlp(), iter([(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))]))


def test_max_samples_and_a_summed_loss() -> None:
    model, data = _mlp(), _tab_data(n_batches=3)
    assert _run(model, data, max_samples=11).samples == 11
    per_sample = _run(model, data)
    summed = select_layer(
        model, data, nn.CrossEntropyLoss(reduction="sum"), draws=8, progress=False
    )
    for (n1, s1), (n2, s2) in zip(per_sample.ranking, summed.ranking):
        assert n1 == n2 and s1 == pytest.approx(s2, rel=1e-4)


# --- perturbations -----------------------------------------------------------------------------


def test_both_perturbations_run_and_differ() -> None:
    model, data = SmallConv(), _img_data()
    g, r = _run(model, data), _run(model, data, perturbation="reinit")
    assert set(g.scores) == set(r.scores) and g.scores != r.scores
    assert g.perturbation == "gaussian" and r.perturbation == "reinit"


def test_reinit_draws_follow_reset_parameters() -> None:
    layer = nn.Linear(50, 40)
    w = _draw_weights(layer, 64, "reinit", 1.0, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(50)  # nn.Linear's kaiming_uniform_(a=sqrt(5))
    assert w.shape == (64, 40, 50) and w.abs().max() <= bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    g = _draw_weights(layer, 64, "gaussian", 0.5, torch.Generator().manual_seed(0))
    assert (g - layer.weight).std().item() == pytest.approx(
        0.5 * layer.weight.std().item(), rel=0.02
    )

    class Custom(nn.Linear):
        def reset_parameters(self) -> None:
            nn.init.constant_(self.weight, 7.0)

    custom = Custom(3, 2)
    assert (_draw_weights(custom, 2, "reinit", 1.0, torch.Generator()) == 7.0).all()


# --- the base model is left alone ---------------------------------------------------------------


def test_base_model_state_is_unchanged() -> None:
    model = SmallConv()
    model.train()
    model.bn.eval()
    model.conv1.weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for perturbation in ("gaussian", "reinit"):
        for vectorize in (True, False):
            _run(model, _img_data(), perturbation=perturbation, vectorize=vectorize)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BatchNorm running stats
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


# --- vmap and the loop --------------------------------------------------------------------------


def test_vmap_and_loop_paths_agree() -> None:
    model, data = SmallConv(), _img_data()
    v = _run(model, data, chunk_size=3)
    loop = _run(model, data, vectorize=False)
    assert all(s.vectorized for s in v.layers) and not any(s.vectorized for s in loop.layers)
    for (n1, s1), (n2, s2) in zip(v.ranking, loop.ranking):
        assert n1 == n2 and s1 == pytest.approx(s2, rel=1e-4, abs=1e-3)


def test_falls_back_to_the_loop_when_vmap_fails() -> None:
    torch.manual_seed(0)
    model, data = DataDependent(), _tab_data()
    with pytest.warns(UserWarning, match=r"vmap could not evaluate 1 of 2 layers \(a\)"):
        v = _run(model, data)
    # Perturbing ``b`` leaves the data-dependent branch unbatched, so only ``a`` loops.
    assert {s.name: s.vectorized for s in v.layers} == {"a": False, "b": True}
    loop = _run(model, data, vectorize=False)
    assert v.scores == pytest.approx(loop.scores, rel=1e-5)


# --- Hugging Face dict batches ------------------------------------------------------------------


def test_hf_dict_batches() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(0, 50, (5, 8), generator=g),
        "attention_mask": torch.ones(5, 8, dtype=torch.long),
        "labels": torch.randint(0, 3, (5,), generator=g),
    }
    batch["attention_mask"][0, 5:] = 0
    was_training = model.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a vmap fallback nor a batching-rule warning
        scores = _run(model, [batch], draws=4, exclude="*attention.self.*")
    assert "classifier" in scores.scores and len(scores.ranking) == 8
    assert all(s.vectorized for s in scores.layers)
    assert model.training == was_training
