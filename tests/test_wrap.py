"""The foundation battery: wrap, the dynamic layer, disable/unload, over a matrix of tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    Case,
    bert_case,
    bert_seq_case,
    lenet_conv_case,
    lenet_linear_case,
    make_mlp,
    make_st,
    mlp_case,
    resnet_case,
    st_inputs,
)

import ocdwrap
from ocdwrap.batches import call_model, index_batch, read_output
from ocdwrap.errors import (
    CalibrationRequiredError,
    LayerNotFoundError,
    NotFittedError,
    UnsupportedLayerError,
)
from ocdwrap.layer import FullDelta, Rank1Delta

CASES = [
    mlp_case(),
    lenet_linear_case(),
    lenet_conv_case(),
    bert_case(),
    bert_seq_case(),
    resnet_case("fc"),
    resnet_case("layer2.0.conv1"),  # stride 2, padding 1
    resnet_case("layer2.0.downsample.0"),  # 1x1 stride 2, no padding
]


def _run(model, inputs):
    return read_output(call_model(model, inputs))


def _battery(make, layer: str, inputs) -> None:
    base = make()
    reference = copy.deepcopy(base)
    with torch.no_grad():
        expected = _run(base, inputs)
    grads = {n: p.requires_grad for n, p in base.named_parameters()}
    model = ocdwrap.wrap(base, layer=layer)
    assert all(not p.requires_grad for p in model.base_model.parameters())
    B = expected.shape[0]
    W = model.target_layer.weight

    with torch.no_grad():
        # a zero delta reproduces the base output exactly
        with model.use_deltas(FullDelta(torch.zeros(B, *W.shape))):
            assert torch.equal(_run(model, inputs), expected)
        # distinct deltas: each sample gets the base model's output with its own weights
        g = torch.Generator().manual_seed(1)
        deltas = 0.5 * W.std() * torch.randn(B, *W.shape, generator=g)
        with model.use_deltas(FullDelta(deltas)):
            got = _run(model, inputs)
        assert (got - expected).abs().max() > 1e-5, "the deltas must change the output"
        for b in range(B):
            manual = copy.deepcopy(reference)
            dict(manual.named_modules())[layer].weight.add_(deltas[b])
            want = _run(manual, index_batch(inputs, slice(b, b + 1)))
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-4, atol=1e-5)
        # disable_adapter gives the base behaviour even with deltas set
        with model.use_deltas(FullDelta(deltas)), model.disable_adapter():
            assert torch.equal(_run(model, inputs), expected)
    unloaded = model.unload()
    assert unloaded is base
    assert type(dict(unloaded.named_modules())[layer]).__name__ in ("Linear", "Conv2d")
    assert {n: p.requires_grad for n, p in unloaded.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(_run(unloaded, inputs), expected)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_battery(case: Case) -> None:
    _battery(case.make, case.layer, case.inputs(2))


def test_battery_sentence_transformer(tiny_st_dir: str) -> None:
    probe = make_st(tiny_st_dir)
    inputs = st_inputs(probe, 3)
    _battery(lambda: make_st(tiny_st_dir), "2.linear", inputs)


def test_rank1_delta_equals_its_matrix() -> None:
    case = mlp_case()
    model = ocdwrap.wrap(case.make(), layer="fc2")
    x = case.inputs(4)
    u, v = torch.randn(4, 16), torch.randn(4, 32)
    with torch.no_grad():
        with model.use_deltas(Rank1Delta(u, v)):
            a = model(x)
        with model.use_deltas(FullDelta(Rank1Delta(u, v).full())):
            b = model(x)
    torch.testing.assert_close(a, b)


def test_unknown_layer_lists_candidates() -> None:
    with pytest.raises(LayerNotFoundError, match="fc2") as e:
        ocdwrap.wrap(mlp_case().make(), layer="fc22")
    assert "Did you mean" in str(e.value)


def test_unsupported_layer_type() -> None:
    base = bert_case().make()
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        ocdwrap.wrap(base, layer="bert.embeddings.LayerNorm")


def test_auto_without_calibration_is_a_clear_error() -> None:
    with pytest.raises(CalibrationRequiredError, match="calibration"):
        ocdwrap.wrap(mlp_case().make(), layer="auto")


def test_call_before_fit_is_a_clear_error() -> None:
    model = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    with pytest.raises(NotFittedError, match="ocdwrap.fit"):
        model(torch.randn(2, 10))
    with model.disable_adapter():
        assert model(torch.randn(2, 10)).shape == (2, 3)


def test_capture_pools_per_sample_not_across_batch() -> None:
    case = bert_seq_case()
    model = ocdwrap.wrap(case.make(), layer=case.layer)
    inputs = case.inputs(3)
    with torch.no_grad():
        cond, _ = model.conditioning(**inputs)
        for b in range(3):
            one, _ = model.conditioning(**index_batch(inputs, slice(b, b + 1)))
            torch.testing.assert_close(
                cond.layer_input[b : b + 1], one.layer_input, rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(
                cond.model_output[b : b + 1], one.model_output, rtol=1e-5, atol=1e-6
            )
    # the padded sample's pooled input ignores its padding
    mask = inputs["attention_mask"][1].bool()
    assert not mask.all()


def test_shared_layer_reached_twice_is_an_error() -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    model = ocdwrap.wrap(Twice(), layer="lin")
    with pytest.raises(ocdwrap.errors.LayerReachError, match="more than once"):
        model.conditioning(torch.randn(2, 4))


def test_layer_never_reached_is_an_error() -> None:
    class Unused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(4, 2)
            self.unused = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    model = ocdwrap.wrap(Unused(), layer="unused")
    with pytest.raises(ocdwrap.errors.LayerReachError, match="never reached"):
        model.conditioning(torch.randn(2, 4))


def test_gradient_checkpointing_does_not_corrupt_capture() -> None:
    from torch.utils.checkpoint import checkpoint

    class Ckpt(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(6, 8)
            self.b = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = checkpoint(lambda z: torch.relu(self.a(z)), x, use_reentrant=False)
            return self.b(h)

    torch.manual_seed(0)
    base = Ckpt()
    model = ocdwrap.wrap(base, layer="a")
    x = torch.randn(4, 6)
    y = torch.tensor([0, 1, 2, 0])
    res = ocdwrap.overfit_batch(model, x, y, torch.nn.CrossEntropyLoss(reduction="none"))
    ref = ocdwrap.overfit_one(model, x, y, torch.nn.CrossEntropyLoss(reduction="none"))
    torch.testing.assert_close(res.delta, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.cond.layer_input, x)


def _hub_cache(root, repo: str, adapter_dir) -> str:
    """A Hugging Face Hub cache folder holding ``adapter_dir`` as ``repo``'s main revision."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(adapter_dir, repo_dir / "snapshots" / commit)
    return str(root)


def test_from_pretrained_reads_a_hub_repo_from_the_local_cache(tmp_path) -> None:
    torch.manual_seed(0)
    base = make_mlp()
    model = ocdwrap.wrap(base, layer="fc2", config=ocdwrap.OCDConfig(delta="rank1"))
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    store = ocdwrap.collect(model, [(x, y)], ce, tmp_path / "d", progress=False)
    ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=2, batch_size=8), progress=False)
    model.save_pretrained(tmp_path / "adapter")
    with model.sampling(seed=0):
        expected = model(x)
    cache = _hub_cache(tmp_path / "hub", "someone/ocd-mlp", tmp_path / "adapter")
    loaded = ocdwrap.OCDModel.from_pretrained(
        model.unload(), "someone/ocd-mlp", cache_dir=cache, local_files_only=True
    )
    with loaded.sampling(seed=0):
        torch.testing.assert_close(loaded(x), expected)
    # not in the cache, and no network allowed: an error naming both readings of the name
    with pytest.raises(ocdwrap.errors.AdapterNotFoundError, match="no directory 'someone/other'"):
        ocdwrap.OCDModel.from_pretrained(
            make_mlp(), "someone/other", cache_dir=cache, local_files_only=True
        )


@pytest.mark.parametrize("path", ["./adapter", "/no/such/adapter", "a/b/c", "~/adapter"])
def test_a_missing_local_path_is_an_error_naming_it_not_a_hub_lookup(path, monkeypatch) -> None:
    import huggingface_hub

    def no_network(*a, **kw):
        raise AssertionError("a local path was sent to the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(ocdwrap.errors.AdapterNotFoundError, match="does not exist") as e:
        ocdwrap.OCDModel.from_pretrained(make_mlp(), path)
    assert path in str(e.value)


def test_trainable_parameters_are_the_hypernetwork_s(tmp_path, capsys) -> None:
    base = make_mlp()
    n_base = sum(p.numel() for p in base.parameters())
    model = ocdwrap.wrap(base, layer="fc2", config=ocdwrap.OCDConfig(delta="rank1"))
    assert model.get_nb_trainable_parameters() == (0, n_base)  # nothing fitted yet
    x, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    store = ocdwrap.collect(model, [(x, y)], ce, tmp_path / "d", progress=False)
    ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=1, batch_size=8), progress=False)
    h = model.hypernet
    expected = sum(p.numel() for p in h.net.parameters()) + sum(
        p.numel() for p in h.scale.parameters()
    )
    assert model.get_nb_trainable_parameters() == (expected, n_base + expected)
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable params: {expected:,} || all params: {n_base + expected:,}" in out


def test_save_pretrained_writes_a_model_card_that_info_reads_back(tmp_path, capsys) -> None:
    from ocdwrap.cli import main
    from ocdwrap.describe import describe

    base = make_mlp()
    base.name_or_path = "someone/tiny-mlp"  # as Hugging Face models record where they came from
    model = ocdwrap.wrap(base, layer="fc2", config=ocdwrap.OCDConfig(delta="rank1"))
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    store = ocdwrap.collect(model, [(x[:16], y[:16])], ce, tmp_path / "d", progress=False)
    report = ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=3, batch_size=8), progress=False)
    ocdwrap.headroom(model, [(x[16:], y[16:])], ce, train_loader=[(x[:16], y[:16])])
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ocdwrap\n")
    assert 'base_model: "someone/tiny-mlp"' in card and "`fc2` (linear, weight 16 x 32)" in card
    assert f"final denoising loss {report.final_loss:.4g}" in card
    assert "## Can OCD help on this model?" in card and "overfit" in card
    (info,) = describe(str(tmp_path / "a"))
    assert info["model_card"]["base_model"] == "someone/tiny-mlp"
    assert info["model_card"]["sections"] == [
        "Fit",
        "Can OCD help on this model? (`ocdwrap.headroom`)",
    ]
    assert main(["info", str(tmp_path / "a")]) == 0
    assert "base model someone/tiny-mlp" in capsys.readouterr().out
    # a README of the user's own is never replaced
    own = tmp_path / "b"
    own.mkdir()
    (own / "README.md").write_text("# my notes\n")
    model.save_pretrained(own)
    assert (own / "README.md").read_text() == "# my notes\n"
    assert ocdwrap.OCDModel.from_pretrained(make_mlp(), own).hypernet is not None


def test_fit_continues_from_an_adapter_loaded_with_is_trainable(tmp_path) -> None:
    torch.manual_seed(0)
    base = make_mlp()
    cfg = ocdwrap.OCDConfig(delta="rank1", cond_dim=16, mlp_hidden=32, mlp_layers=2)
    model = ocdwrap.wrap(base, layer="fc2", config=cfg)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    store = ocdwrap.collect(model, [(x, y)], ce, tmp_path / "d", progress=False)
    first = ocdwrap.fit(
        model, store, ocdwrap.FitArgs(steps=300, batch_size=32, lr=3e-3), progress=False
    )
    model.save_pretrained(tmp_path / "a")
    saved = {k: v.clone() for k, v in model.hypernet.state_dict().items()}
    base = model.unload()

    def first_losses(report) -> float:
        return sum(report.losses[:20]) / 20

    # is_trainable=True: fit goes on from the saved weights and statistics (steps are extra)
    cont = ocdwrap.OCDModel.from_pretrained(base, tmp_path / "a", is_trainable=True)
    loaded = cont.hypernet
    report = ocdwrap.fit(
        cont, store, ocdwrap.FitArgs(steps=20, batch_size=32, lr=3e-3, seed=1), progress=False
    )
    assert cont.hypernet is loaded and report.steps == 20
    for k in ("rho_mean", "target_mean", "target_scale"):  # the statistics it was fitted with
        if k in saved:
            torch.testing.assert_close(cont.hypernet.state_dict()[k], saved[k], msg=k)
    base = cont.unload()
    # without it, fit starts a fresh hypernetwork: its first losses are those of an untrained one
    fresh = ocdwrap.OCDModel.from_pretrained(base, tmp_path / "a")
    again = ocdwrap.fit(
        fresh, store, ocdwrap.FitArgs(steps=20, batch_size=32, lr=3e-3, seed=1), progress=False
    )
    assert first_losses(first) > 1.5 * first.final_loss  # the first fit did learn something
    assert first_losses(report) < 0.5 * (first.final_loss + first_losses(first))
    assert first_losses(again) > 0.5 * (first.final_loss + first_losses(first))
    # a collection of another shape is refused, naming the fix
    other = ocdwrap.wrap(make_mlp(), layer="fc1", config=cfg)
    store1 = ocdwrap.collect(other, [(x, y)], ce, tmp_path / "d1", progress=False)
    ocdwrap.fit(other, store1, ocdwrap.FitArgs(steps=2, batch_size=32), progress=False)
    other.is_trainable = True
    other.hypernet = loaded
    with pytest.raises(ocdwrap.errors.BaseModelMismatchError, match="is_trainable"):
        ocdwrap.fit(other, store1, ocdwrap.FitArgs(steps=2, batch_size=32), progress=False)
