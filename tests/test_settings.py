"""Settings by role: OCDConfig defines the adapter, FitArgs the fit, SamplingConfig the sampling
defaults (ocd_sampling.json); selection and collection settings are function arguments; 0.1.0's
flat config is read into these homes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from conftest import lenet_linear_case, make_mlp

import ocdwrap
from ocdwrap.config import collection_identity, results_fields, split_legacy
from ocdwrap.errors import ConfigError
from ocdwrap.io import CONFIG_NAME, SAMPLING_NAME
from ocdwrap.settings import MOVED

CE = torch.nn.CrossEntropyLoss(reduction="none")
ADAPTERS = os.path.join(os.path.dirname(__file__), "data", "adapters")
SMALL = dict(delta="rank1", cond_dim=16, mlp_hidden=16, mlp_layers=2)


def test_every_field_has_one_home() -> None:
    homes = [ocdwrap.OCDConfig, ocdwrap.FitArgs, ocdwrap.SamplingConfig]
    for cls in homes:
        for f in dataclasses.fields(cls):
            assert f.metadata["help"], (cls.__name__, f.name)
    adapter = {f.name for f in dataclasses.fields(ocdwrap.OCDConfig)}
    assert not adapter & set(MOVED)  # a moved field is no adapter field any more
    for old, (home, new) in MOVED.items():
        if home in ("FitArgs", "SamplingConfig"):
            assert new in {f.name for f in dataclasses.fields(getattr(ocdwrap, home))}, old
    import inspect

    from ocdwrap.collect import collect
    from ocdwrap.select import select_layer

    for old, (home, new) in MOVED.items():
        if home in ("collect", "select_layer"):
            fn = {"collect": collect, "select_layer": select_layer}[home]
            assert new in inspect.signature(fn).parameters, old


def test_a_moved_field_names_its_new_home() -> None:
    with pytest.raises(ConfigError, match=r"fit_steps -> FitArgs\(steps=...\)"):
        ocdwrap.OCDConfig(fit_steps=10)
    with pytest.raises(ConfigError, match=r"num_draws -> SamplingConfig\(num_draws=...\)"):
        ocdwrap.OCDConfig(delta="rank1", num_draws=5)
    with pytest.raises(ConfigError, match=r"shard_size -> collect\(..., shard_size=...\)"):
        ocdwrap.OCDConfig(shard_size=16)
    model = ocdwrap.wrap(make_mlp(), layer="fc2")
    with pytest.raises(TypeError, match="FitArgs"):
        ocdwrap.fit(model, "nowhere", steps=3)
    with pytest.raises(TypeError, match="layer-selection settings"):
        ocdwrap.wrap(make_mlp(), layer="fc2", draws=4)


def test_bad_values_are_named() -> None:
    with pytest.raises(ConfigError, match="FitArgs.steps=0"):
        ocdwrap.FitArgs(steps=0)
    with pytest.raises(ConfigError, match="SamplingConfig.sampler='euler'"):
        ocdwrap.SamplingConfig(sampler="euler")
    with pytest.raises(ConfigError, match="SamplingConfig.scale='none'"):
        ocdwrap.SamplingConfig(scale="none")
    with pytest.raises(ConfigError, match="num_train_timesteps=5"):
        ocdwrap.wrap(
            make_mlp(),
            layer="fc2",
            config=ocdwrap.OCDConfig(num_train_timesteps=5),
            sampling=ocdwrap.SamplingConfig(sampling_steps=10),
        )
    model = ocdwrap.wrap(make_mlp(), layer="fc2")
    with (
        pytest.raises(TypeError, match="fields of ocdwrap.SamplingConfig"),
        model.sampling(steps=3),
    ):
        pass


def test_the_metadata_drives_identity_and_run_id() -> None:
    cfg = ocdwrap.OCDConfig(delta="rank1")
    ident = collection_identity(cfg)
    assert set(ident) == {
        "overfit_steps",
        "overfit_optimizer",
        "overfit_lr",
        "adam_betas",
        "adam_eps",
        "delta_normalization",
    }  # as 0.1.0 wrote it for a rank-one collection: its collections still resume
    assert {"delta", "delta_rank"} <= set(collection_identity(cfg.replace(delta="auto")))
    assert collection_identity(cfg.replace(output_grid=4))["output_grid"] == 4
    assert "output_grid" not in ident  # a field added later enters only when not its default
    assert "mlp_hidden" not in ident  # the networks do not change what is collected
    fit = results_fields(ocdwrap.FitArgs(checkpoint_every=7, micro_batch_size=3))
    assert "checkpoint_every" not in fit and "micro_batch_size" not in fit and "lr" in fit
    assert "layer_ranking" not in results_fields(cfg) and "mlp_hidden" in results_fields(cfg)


def test_legacy_flat_config_is_split_into_its_homes() -> None:
    with open(os.path.join(ADAPTERS, "v0.1.0-rank1", CONFIG_NAME)) as f:
        flat = json.load(f)
    homes = split_legacy(flat)
    assert homes["FitArgs"]["steps"] == flat["fit_steps"]
    assert homes["SamplingConfig"]["sampling_steps"] == 10
    assert homes["select_layer"] == {"perturbation": "gaussian", "draws": 32, "noise_scale": 1.0}
    assert homes["collect"] == {"shard_size": 4096, "on_nonfinite": "skip"}
    cfg = ocdwrap.OCDConfig.from_dict(flat)  # no warning about the moved keys
    assert cfg.delta == "rank1" and cfg.mlp_hidden == 16
    ocdwrap.FitArgs.from_dict(homes["FitArgs"])
    ocdwrap.SamplingConfig.from_dict(homes["SamplingConfig"])


def test_v0_1_0_adapter_keeps_its_sampling_defaults_and_saves_in_the_new_layout(tmp_path) -> None:
    model = ocdwrap.OCDModel.from_pretrained(make_mlp(), os.path.join(ADAPTERS, "v0.1.0-rank1"))
    assert model.sampling_config.sampling_steps == 10  # its flat config's, not today's default
    model.save_pretrained(tmp_path / "a")
    with open(tmp_path / "a" / CONFIG_NAME) as f:
        saved = json.load(f)
    assert not set(saved) & set(MOVED)
    assert saved["ocdwrap_version"] == 2 and saved["library_version"] == ocdwrap.__version__
    with open(tmp_path / "a" / SAMPLING_NAME) as f:
        assert json.load(f)["sampling_steps"] == 10
    again = ocdwrap.OCDModel.from_pretrained(model.unload(), tmp_path / "a")
    assert again.sampling_config == model.sampling_config


def test_fitted_lenet_adapter_files_hold_each_setting_in_its_home(tmp_path) -> None:
    case = lenet_linear_case()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    sampling = ocdwrap.SamplingConfig(num_draws=3, seed=1)
    model = ocdwrap.wrap(
        case.make(), layer="fc2", config=ocdwrap.OCDConfig(**SMALL), sampling=sampling
    )
    store = ocdwrap.collect(model, [(x, y)], CE, tmp_path / "d", progress=False)
    report = ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=3, batch_size=8), progress=False)
    assert report.args["steps"] == 3 and report.args["batch_size"] == 8
    model.save_pretrained(tmp_path / "a")
    with open(tmp_path / "a" / CONFIG_NAME) as f:
        saved = json.load(f)
    adapter = {f.name for f in dataclasses.fields(ocdwrap.OCDConfig)}
    assert set(saved) == adapter  # only adapter fields
    assert saved["base_model_class"] == type(model.base_model).__name__
    with open(tmp_path / "a" / SAMPLING_NAME) as f:
        assert json.load(f) == sampling.to_dict()
    assert ocdwrap.SamplingConfig.load(tmp_path / "a") == sampling
    assert ocdwrap.OCDConfig.load(tmp_path / "a").mlp_hidden == SMALL["mlp_hidden"]
    loaded = ocdwrap.OCDModel.from_pretrained(model.unload(), tmp_path / "a")
    assert loaded.sampling_config == sampling
    with torch.no_grad():
        out = loaded(x[:2])  # three draws averaged, seed 1: twice the same
        torch.testing.assert_close(out, loaded(x[:2]))


def test_checkpoint_records_the_fit_args_and_refuses_other_ones(tmp_path) -> None:
    from ocdwrap.errors import BaseModelMismatchError

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 10, generator=g), torch.randint(0, 3, (24,), generator=g)
    model = ocdwrap.wrap(make_mlp(), layer="fc2", config=ocdwrap.OCDConfig(**SMALL))
    store = ocdwrap.collect(model, [(x, y)], CE, tmp_path / "d", progress=False)
    args = ocdwrap.FitArgs(steps=4, batch_size=8, checkpoint_every=2)
    ocdwrap.fit(model, store, args, checkpoint_dir=tmp_path / "c", progress=False)
    with open(tmp_path / "c" / "fit_checkpoint.json") as f:
        run_id = json.load(f)["run_id"]
    assert run_id["args"] == results_fields(args) and run_id["format"] == 2
    # checkpoint_every does not change what a step computes: the same run
    same = args.replace(checkpoint_every=4)
    assert ocdwrap.fit(model, store, same, checkpoint_dir=tmp_path / "c", progress=False)
    with pytest.raises(BaseModelMismatchError, match="another fit"):
        ocdwrap.fit(
            model, store, args.replace(lr=1e-3), checkpoint_dir=tmp_path / "c", progress=False
        )
    shutil.rmtree(tmp_path / "c")
