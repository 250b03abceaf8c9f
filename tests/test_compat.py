"""Adapters saved by an earlier release load and predict the same today (tests/data/adapters)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ocdwrap

HERE = os.path.join(os.path.dirname(__file__), "data", "adapters")


class MLP(nn.Module):  # the base model tests/data/adapters/make_adapters.py fitted them on
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("name", ["v0.1.0-rank1", "v0.1.0-full"])
def test_adapter_saved_by_v0_1_0_predicts_the_same(name: str) -> None:
    directory = os.path.join(HERE, name)
    expected = load_file(os.path.join(directory, "expected_outputs.safetensors"))
    torch.manual_seed(0)
    model = ocdwrap.OCDModel.from_pretrained(MLP().eval(), directory)
    with model.sampling(seed=0):
        one = model(expected["input"])
    with model.sampling(seed=1, num_draws=3):
        three = model(expected["input"])
    torch.testing.assert_close(one, expected["one_draw"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(three, expected["three_draws"], rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # and the adapter changes the prediction (a non-trivial check)
        assert not torch.allclose(model(expected["input"]), expected["one_draw"])


def test_missing_adapter_files_raise_an_ocd_error(tmp_path) -> None:
    with pytest.raises(ocdwrap.OCDError, match="does not exist") as err:
        ocdwrap.OCDModel.from_pretrained(MLP(), tmp_path / "nowhere")
    assert isinstance(err.value, FileNotFoundError)  # also what callers caught before
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "ocd_config.json").write_text(
        open(os.path.join(HERE, "v0.1.0-rank1", "ocd_config.json")).read()
    )
    with pytest.raises(ocdwrap.OCDError, match="lacks ocd_model.safetensors"):
        ocdwrap.OCDModel.from_pretrained(MLP(), partial)


# --- collections and a fit checkpoint written by 0.1.0 (tests/data/collections) -------------------
COLLECTIONS = os.path.join(os.path.dirname(__file__), "data", "collections")


class Net(nn.Module):  # the base model tests/data/collections/make_collections.py collected on
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 6 * 6, 24)
        self.fc2 = nn.Linear(24, 12)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def _ce(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(p, y, reduction="none")


def _fixture_loader(n: int = 40) -> torch.utils.data.DataLoader:
    d = load_file(os.path.join(COLLECTIONS, "data.safetensors"))
    ds = torch.utils.data.TensorDataset(d["x"][:n], d["y"][:n])
    return torch.utils.data.DataLoader(ds, batch_size=8)


SETTINGS = {
    "rank1": ("fc2", dict(delta="rank1")),
    "full": ("fc2", dict(delta="full")),
    "lowrank": ("conv", dict(delta="lowrank", delta_rank=2)),
}
SHARD = 16  # the fixtures' shard size (a collection's identity holds it)


def _copy(name: str, tmp_path) -> str:
    import shutil

    return shutil.copytree(os.path.join(COLLECTIONS, f"v0.1.0-{name}"), tmp_path / name)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_collection_written_by_v0_1_0_loads_unverified_and_is_reused(name: str, tmp_path) -> None:
    d = _copy(name, tmp_path)
    old = ocdwrap.DeltaStore(d)
    assert old.complete and len(old) == 40 and not old.verified
    assert old.stopped is None  # 0.1.0 did not record why it stopped
    before = old.load()
    layer, cfg = SETTINGS[name]
    model = ocdwrap.wrap(_net(), layer=layer, config=ocdwrap.OCDConfig(**cfg))
    # the same data again: nothing is overfitted anew, and now the manifest knows it is whole
    store = ocdwrap.collect(model, _fixture_loader(), _ce, d, progress=False, shard_size=SHARD)
    assert store.stopped == "end_of_data" and store.positions == 40 and len(store) == 40
    after = store.load()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    # and what today's code collects from scratch is the same (the format did not drift)
    fresh = ocdwrap.collect(
        model, _fixture_loader(), _ce, tmp_path / "fresh", progress=False, shard_size=SHARD
    )
    assert fresh.verified and fresh.keys == old.keys
    new = fresh.load()
    for k, v in before.items():
        torch.testing.assert_close(new[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_interrupted_collection_written_by_v0_1_0_resumes_to_the_whole(tmp_path) -> None:
    d = _copy("rank1-interrupted", tmp_path)
    part = ocdwrap.DeltaStore(d)
    assert not part.complete and len(part) == 16
    layer, cfg = SETTINGS["rank1"]
    model = ocdwrap.wrap(_net(), layer=layer, config=ocdwrap.OCDConfig(**cfg))
    store = ocdwrap.collect(model, _fixture_loader(), _ce, d, progress=False, shard_size=SHARD)
    assert store.complete and store.stopped == "end_of_data"
    whole = ocdwrap.DeltaStore(os.path.join(COLLECTIONS, "v0.1.0-rank1")).load()
    got = store.load()
    for k, v in whole.items():
        assert torch.equal(v, got[k]), k
    # the shards written today are checksummed, the one 0.1.0 wrote is not
    assert [bool(s.get("digests")) for s in store.manifest["shards"]] == [False, True, True]


def test_collection_written_by_v0_1_0_continues_when_the_data_goes_further(tmp_path) -> None:
    # 0.1.0 did not record whether max_samples stopped a collection: collect reads the data on
    d = _copy("rank1", tmp_path)
    full = ocdwrap.DeltaStore(os.path.join(COLLECTIONS, "v0.1.0-rank1")).load()
    layer, cfg = SETTINGS["rank1"]
    model = ocdwrap.wrap(_net(), layer=layer, config=ocdwrap.OCDConfig(**cfg))
    # the first 32 of its 40 samples are asked for: it holds them, returned at once
    store = ocdwrap.collect(
        model, _fixture_loader(), _ce, d, max_samples=32, progress=False, shard_size=SHARD
    )
    assert len(store) == 40 and store.stopped is None
    # a loader of 48 samples whose first 40 are the same: only the last 8 are overfitted
    g = torch.Generator().manual_seed(1)
    x = torch.cat([load_file(os.path.join(COLLECTIONS, "data.safetensors"))["x"]])
    y = load_file(os.path.join(COLLECTIONS, "data.safetensors"))["y"]
    x = torch.cat([x, torch.randn(8, 1, 6, 6, generator=g)])
    y = torch.cat([y, torch.randint(0, 3, (8,), generator=g)])
    more = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    store = ocdwrap.collect(model, more, _ce, d, progress=False, shard_size=SHARD)
    assert len(store) == 48 and store.stopped == "end_of_data"
    got = store.load()
    for k, v in full.items():
        assert torch.equal(v, got[k][:40]), k
    assert torch.equal(got["index"], torch.arange(48))


def test_fit_checkpoint_written_by_v0_1_0_resumes(tmp_path) -> None:
    import shutil

    ckpt = shutil.copytree(os.path.join(COLLECTIONS, "v0.1.0-fit-checkpoint"), tmp_path / "ckpt")
    cfg = ocdwrap.OCDConfig(delta="rank1", cond_dim=16, mlp_hidden=16, mlp_layers=2)
    model = ocdwrap.wrap(_net(), layer="fc2", config=cfg)
    store = os.path.join(COLLECTIONS, "v0.1.0-rank1")
    report = ocdwrap.fit(
        model,
        store,
        ocdwrap.FitArgs(steps=8, batch_size=8, seed=0, checkpoint_every=4),
        progress=False,
        checkpoint_dir=ckpt,
    )
    assert report.resumed_from == 4
    expected = load_file(os.path.join(COLLECTIONS, "fit_8_steps_expected.safetensors"))
    got = model.hypernet.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_info_says_0_1_0_files_are_unverified(tmp_path, capsys) -> None:
    from ocdwrap.describe import describe

    (collection,) = describe(os.path.join(COLLECTIONS, "v0.1.0-rank1"))
    assert collection["checksums"].startswith("none")
    (adapter,) = describe(os.path.join(HERE, "v0.1.0-rank1"))
    assert adapter["checksums"].startswith("none")
    layer, cfg = SETTINGS["rank1"]
    model = ocdwrap.wrap(_net(), layer=layer, config=ocdwrap.OCDConfig(**cfg))
    store = ocdwrap.collect(
        model, _fixture_loader(), _ce, tmp_path / "new", progress=False, shard_size=SHARD
    )
    (new,) = describe(store.directory)
    assert new["checksums"].startswith("xxh3_64")
