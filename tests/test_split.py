"""The split forward (ocdwrap.split): the prefix once, the suffix per pass, same results."""

from __future__ import annotations

import pytest
import torch
from conftest import lenet_conv_case, lenet_linear_case, mlp_case, resnet_case
from torch import nn

import ocdwrap
from ocdwrap import split as split_mod
from ocdwrap.split import SplitError, SplitModel

CE = nn.CrossEntropyLoss(reduction="none")


class Residual(nn.Module):
    """The target's input is reused after it, and written in place downstream of the target."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(8, 3)
        self.register_buffer("shift", torch.full((8,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        z = self.act(h + self.shift)  # an in-place module upstream of the target
        y = self.mid(h)
        h.mul_(torch.sigmoid(y))  # downstream, in place on a value from upstream
        return self.out(y + h + z)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if h.sum() > 0:
            h = h * 2
        return self.b(h)


def _whole(model: ocdwrap.OCDModel, fn):
    with split_mod.whole_passes():
        return fn()


@pytest.mark.parametrize(
    "case",
    [
        mlp_case(),
        lenet_linear_case(),
        lenet_conv_case(),
        resnet_case("fc"),
        resnet_case("layer4.1.conv1"),
    ],
    ids=lambda c: c.name,
)
def test_split_equals_the_model(case) -> None:
    model = ocdwrap.wrap(case.make(), layer=case.layer)
    x = case.inputs(4)
    split = SplitModel(model.base_model, case.layer)
    with torch.no_grad():
        want = model.base_model(x)
        boundary = split.prefix((x,), {})
        assert torch.equal(split.suffix(boundary), want)
        assert torch.equal(split.suffix(boundary), want)  # a second pass from the same prefix
    assert len(split.suffix_nodes) < len(split.prefix_nodes) + len(split.suffix_nodes)


def test_in_place_suffix_clones_the_boundary() -> None:
    torch.manual_seed(0)
    model = ocdwrap.wrap(Residual().eval(), layer="mid")
    split = SplitModel(model.base_model, "mid")
    assert split.clone_boundary
    x = torch.randn(5, 6)
    with torch.no_grad():
        want = model.base_model(x)
        boundary = split.prefix((x,), {})
        for _ in range(3):
            assert torch.equal(split.suffix(boundary), want)


def test_untraceable_model_runs_whole_passes() -> None:
    torch.manual_seed(0)
    with pytest.raises(SplitError):
        SplitModel(ocdwrap.wrap(Branchy().eval(), layer="b").base_model, "b")
    model = ocdwrap.wrap(Branchy().eval(), layer="b")
    x, y = torch.randn(6, 4), torch.arange(6) % 2
    assert split_mod.split_for(model, (x,), {}, lambda: model.base_model(x)) is None
    res = ocdwrap.overfit_batch(model, x, y, CE)
    ref = ocdwrap.overfit_one(model, x, y, CE)
    assert (res.delta - ref).abs().max() < 1e-5


def test_no_split_in_training_mode_with_root_hooks_or_a_patched_forward() -> None:
    case = mlp_case()
    model = ocdwrap.wrap(case.make(), layer="fc2")
    x = case.inputs(3)
    call = lambda: model.base_model(x)  # noqa: E731
    assert split_mod.split_for(model, (x,), {}, call) is not None
    model.base_model.train()
    assert split_mod.split_for(model, (x,), {}, call) is None
    model.base_model.eval()
    handle = model.base_model.register_forward_hook(lambda *a: None)
    assert split_mod.split_for(model, (x,), {}, call) is None
    handle.remove()
    assert split_mod.split_for(model, (x,), {}, call) is not None
    model.base_model.forward = lambda inp: type(model.base_model).forward(model.base_model, inp)
    assert split_mod.split_for(model, (x,), {}, call) is None  # a forward patched on the instance
    del model.base_model.forward
    assert split_mod.split_for(model, (x,), {}, call) is not None


def test_whole_passes_block_nests_and_stays_in_its_thread() -> None:
    import threading

    case = mlp_case()
    model = ocdwrap.wrap(case.make(), layer="fc2")
    x = case.inputs(3)
    call = lambda: model.base_model(x)  # noqa: E731
    seen = []
    other = threading.Thread(target=lambda: seen.append(split_mod.split_for(model, (x,), {}, call)))
    with split_mod.whole_passes():
        assert split_mod.split_for(model, (x,), {}, call) is None
        with split_mod.whole_passes():
            assert split_mod.split_for(model, (x,), {}, call) is None
        assert split_mod.split_for(model, (x,), {}, call) is None  # still inside the outer block
        other.start()
        other.join()
    assert seen[0] is not None  # another thread keeps the split
    assert split_mod.split_for(model, (x,), {}, call) is not None
    assert not hasattr(split_mod, "ENABLED")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize(
    "case", [mlp_case(), lenet_linear_case(), lenet_conv_case()], ids=lambda c: c.name
)
def test_collection_with_and_without_split_agree(case, optimizer: str) -> None:
    cfg = ocdwrap.OCDConfig(
        overfit_optimizer=optimizer, overfit_lr=1e-2 if optimizer == "sgd" else 5e-4
    )
    model = ocdwrap.wrap(case.make(), layer=case.layer, config=cfg)
    x, y = case.inputs(8), case.targets(8)
    fast = ocdwrap.overfit_batch(model, x, y, CE)
    slow = _whole(model, lambda: ocdwrap.overfit_batch(model, x, y, CE))
    assert split_mod._SPLITS.get(model) is not None  # the fast run did use the split
    assert torch.equal(fast.delta, slow.delta)
    assert torch.equal(fast.loss_after, slow.loss_after)
    for a, b in zip(fast.cond.as_dict().values(), slow.cond.as_dict().values()):
        assert torch.equal(a, b)


def test_an_edited_model_is_caught_by_the_first_use_check(monkeypatch) -> None:
    case = mlp_case()
    model = ocdwrap.wrap(case.make(), layer="fc2")
    x = case.inputs(4)
    # a split whose suffix is wrong (as a trace that baked in a stale branch would be)
    monkeypatch.setattr(SplitModel, "suffix", lambda self, boundary: torch.zeros(4, 3))
    assert split_mod.split_for(model, (x,), {}, lambda: model.base_model(x)) is None
    assert split_mod._SPLITS[model].verified is False


def test_ocd_forward_with_and_without_split_agree(tmp_path) -> None:
    case = lenet_linear_case()
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=16)
    for delta in ("rank1", "full"):
        cfg = ocdwrap.OCDConfig(delta=delta, unet_channels=(8, 16), mlp_hidden=32, cond_dim=32)
        model = ocdwrap.wrap(case.make(), layer="fc2", config=cfg)
        ocdwrap.collect(model, loader, CE, tmp_path / delta, progress=False)
        ocdwrap.fit(
            model, tmp_path / delta, ocdwrap.FitArgs(steps=3, batch_size=16), progress=False
        )
        x = xs[:5]
        with torch.no_grad(), model.sampling(seed=0):
            fast = model(x)
            slow = _whole(model, lambda m=model, x=x: m(x))
            with model.disable_adapter():
                base = model(x)
        assert split_mod._SPLITS[model] is not None and split_mod._SPLITS[model].verified
        assert torch.equal(fast, slow)
        assert not torch.equal(fast, base)
