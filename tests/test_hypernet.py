"""The hypernetwork: fit, generate, ensembles, schedulers, save/load."""

from __future__ import annotations

import pytest
import torch
from conftest import lenet_conv_case, mlp_case
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.errors import AdapterExistsError, BaseModelMismatchError, NotFittedError
from ocdwrap.hypernet import make_scheduler
from ocdwrap.layer import FullDelta, Rank1Delta

CE = torch.nn.CrossEntropyLoss(reduction="none")
SMALL = dict(
    delta="full",  # the full-matrix path unless a test says otherwise
    unet_channels=(8, 16),
    mlp_hidden=32,
    cond_dim=32,
    mlp_layers=2,
)
FIT = dict(batch_size=16)  # the FitArgs of these tests


def _data(n: int = 48) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)),
        batch_size=16,
    )


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("store")
    # delta="full" also stores the rank-one factors, so every delta can be fitted from it
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(delta="full"))
    ocdwrap.collect(m, _data(), CE, d, progress=False)
    return str(d)


def _fitted(store_dir: str, steps: int = 60, **cfg) -> ocdwrap.OCDModel:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(**{**SMALL, **cfg}))
    ocdwrap.fit(m, store_dir, ocdwrap.FitArgs(**FIT, steps=steps), progress=False)
    return m


@pytest.mark.parametrize(
    "cfg",
    [
        dict(delta="full"),
        dict(delta="rank1"),
        dict(delta="full", generator="regression"),
        dict(delta="rank1", generator="regression"),
    ],
    ids=["full", "rank1", "full-regression", "rank1-regression"],
)
def test_fit_lowers_the_loss(store_dir: str, cfg: dict) -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(**{**SMALL, **cfg}))
    report = ocdwrap.fit(m, store_dir, ocdwrap.FitArgs(**FIT, steps=120, lr=1e-3), progress=False)
    first, last = sum(report.losses[:10]) / 10, sum(report.losses[-10:]) / 10
    assert last < 0.9 * first, (first, last)
    assert report.scale_losses[-1] < report.scale_losses[0]
    assert len(report.losses) == 120 and report.samples == 48
    out = m(torch.randn(5, 10))  # end to end, called like the base model
    assert out.shape == (5, 3) and torch.isfinite(out).all()


def test_generation_shapes_and_determinism(store_dir: str) -> None:
    for delta, kind in (("full", FullDelta), ("rank1", Rank1Delta)):
        m = _fitted(store_dir, steps=5, delta=delta)
        cond, _ = m.conditioning(torch.randn(4, 10))
        a = m.generate(cond, num_draws=3, rng=torch.Generator().manual_seed(7))
        b = m.generate(cond, num_draws=3, rng=torch.Generator().manual_seed(7))
        c = m.generate(cond, num_draws=3, rng=torch.Generator().manual_seed(8))
        assert isinstance(a, kind)
        full = a.delta if delta == "full" else a.full()
        assert full.shape == (12, 16, 32)
        assert torch.equal(full, b.delta if delta == "full" else b.full())
        assert not torch.equal(full, c.delta if delta == "full" else c.full())


def test_ensemble_averages_probabilities(store_dir: str) -> None:
    m = _fitted(store_dir, steps=5)
    x = torch.randn(4, 10)
    ens = m.ensemble(x, num_draws=3, rng=torch.Generator().manual_seed(0))
    assert ens.draws.shape == (3, 4, 3)
    probs = ens.draws.softmax(-1)
    torch.testing.assert_close(ens.mean, probs.mean(0))
    torch.testing.assert_close(ens.std, probs.std(0, unbiased=False))
    torch.testing.assert_close(ens.output.softmax(-1), ens.mean)
    torch.testing.assert_close(ens.uncertainty, ens.std.mean(1))
    # each draw is the model with that draw's generated weights
    cond, _ = m.conditioning(x)
    spec = m.generate(cond, num_draws=3, rng=torch.Generator().manual_seed(0))
    with m.use_deltas(FullDelta(spec.delta[1::3])):
        torch.testing.assert_close(m(x), ens.draws[1])
    # the same, reached through the base model's own call signature
    with m.sampling(num_draws=3, seed=0):
        out = m(x)
    ens2 = m.ensemble(x, num_draws=3, rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ens2.output)


def test_regression_task_averages_values(store_dir: str) -> None:
    m = _fitted(store_dir, steps=5)
    x = torch.randn(4, 10)
    with m.sampling(task="regression"):
        ens = m.ensemble(x, num_draws=3, rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ens.mean, ens.draws.mean(0))
    torch.testing.assert_close(ens.output, ens.draws.mean(0))


def test_save_load_round_trip_is_exact(store_dir: str, tmp_path) -> None:
    for delta in ("full", "rank1"):
        m = _fitted(store_dir, steps=20, delta=delta)
        x = torch.randn(6, 10)
        with m.sampling(seed=3):
            before = m(x)
        m.save_pretrained(tmp_path / delta)
        state = {k: v.clone() for k, v in m.hypernet.state_dict().items()}
        base = m.unload()
        loaded = ocdwrap.OCDModel.from_pretrained(base, tmp_path / delta)
        assert loaded.layer_name == "fc2" and not loaded.hypernet.training
        for k, v in loaded.hypernet.state_dict().items():
            assert torch.equal(v, state[k]), k
        with loaded.sampling(seed=3):
            assert torch.equal(loaded(x), before)
        loaded.unload()


def test_save_refuses_to_overwrite(store_dir: str, tmp_path) -> None:
    m = _fitted(store_dir, steps=2)
    m.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterExistsError, match="overwrite=True"):
        m.save_pretrained(tmp_path / "a")
    m.save_pretrained(tmp_path / "a", overwrite=True)


def test_load_onto_a_different_base_fails(store_dir: str, tmp_path) -> None:
    m = _fitted(store_dir, steps=2)
    m.save_pretrained(tmp_path / "a")
    other = mlp_case().make()
    with torch.no_grad():
        other.fc2.weight.add_(0.01)
    with pytest.raises(BaseModelMismatchError, match="different base model"):
        ocdwrap.OCDModel.from_pretrained(other, tmp_path / "a")
    assert type(other.fc2).__name__ == "Linear"  # the failed load left the model as it was


def test_fit_refuses_a_store_from_another_base(store_dir: str) -> None:
    other = mlp_case().make()
    with torch.no_grad():
        other.fc2.weight.mul_(2)
    m = ocdwrap.wrap(other, layer="fc2")
    with pytest.raises(BaseModelMismatchError, match="Collect again"):
        ocdwrap.fit(m, store_dir, ocdwrap.FitArgs(**FIT, steps=1), progress=False)


def test_generate_before_fit_is_a_clear_error() -> None:
    m = ocdwrap.wrap(mlp_case().make(), layer="fc2")
    cond, _ = m.conditioning(torch.randn(2, 10))
    with pytest.raises(NotFittedError):
        m.generate(cond)


def test_conv2d_target_end_to_end_on_full_path(tmp_path) -> None:
    case = lenet_conv_case()
    m = ocdwrap.wrap(case.make(), layer="conv2", config=ocdwrap.OCDConfig(**SMALL))
    loader = DataLoader(TensorDataset(case.inputs(8), case.targets(8)), batch_size=4)
    store = ocdwrap.collect(m, loader, CE, tmp_path / "conv", progress=False)
    report = ocdwrap.fit(m, store, ocdwrap.FitArgs(**FIT, steps=3), progress=False)
    assert len(report.losses) == 3
    x = case.inputs(3)
    cond, _ = m.conditioning(x)
    spec = m.generate(cond, rng=torch.Generator().manual_seed(0))
    assert spec.delta.shape == (3, 16, 6, 5, 5)
    out = m(x)
    with m.disable_adapter():
        base = m(x)
    assert out.shape == base.shape == (3, 10) and not torch.equal(out, base)


def test_ddim_step_matches_its_formula() -> None:
    cfg = ocdwrap.OCDConfig()
    sched = make_scheduler(cfg, "ddim")
    sched.set_timesteps(10)
    assert sched.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert not sched.config.clip_sample
    betas = torch.linspace(1e-6, 1e-2, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(0)
    x, eps = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    for t, prev in ((900, 800), (0, None)):
        got = sched.step(eps.float(), t, x.float(), eta=0.0).prev_sample.double()
        a_t = abar[t]
        a_prev = abar[prev] if prev is not None else torch.tensor(1.0, dtype=torch.float64)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        want = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert make_scheduler(cfg, "ddpm").config.num_train_timesteps == 1000


@pytest.mark.parametrize("delta", ["full", "rank1"])
def test_cached_ddim_path_equals_the_scheduler_loop(store_dir: str, delta: str) -> None:
    """sample_normalised's precomputed DDIM table gives what diffusers' DDIMScheduler.step gives."""
    m = _fitted(store_dir, steps=2, delta=delta)
    hyper = m.hypernet
    cond, _ = m.conditioning(torch.randn(5, 10))
    fast = hyper.sample_normalised(cond, rng=torch.Generator().manual_seed(3), steps=6)

    with torch.no_grad():  # the reference: the scheduler, step by step
        c = hyper.ema.embed(hyper.features(cond))
        g = torch.Generator().manual_seed(3)
        x = torch.randn((5, *hyper.target_shape), generator=g, dtype=c.dtype)
        sched = make_scheduler(hyper.config, "ddim")
        sched.set_timesteps(6)
        cond = hyper.ema.condition(c)
        for t in sched.timesteps:
            eps = hyper.ema(x, t.view(1), c, cond)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        ref = (x * hyper.target_std).float()
    assert len(hyper._ddim_cache) == 1  # the fast path ran
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)


def test_ddpm_sampler_and_step_count_are_selectable(store_dir: str) -> None:
    m = _fitted(store_dir, steps=2)
    x = torch.randn(2, 10)
    with m.sampling(sampler="ddpm", sampling_steps=4, seed=0):
        a = m(x)
    with m.sampling(sampler="ddim", sampling_steps=4, seed=0):
        b = m(x)
    assert a.shape == b.shape and not torch.equal(a, b)


def test_scale_model_is_positive_and_uncapped(store_dir: str) -> None:
    m = _fitted(store_dir, steps=2)
    cond, _ = m.conditioning(torch.randn(4, 10))
    with torch.no_grad():
        m.hypernet.rho_mean.fill_(5.0)
    rho = m.hypernet.predict_rho(cond)
    assert (rho > 1).all()  # no sigmoid cap below 1
    m.hypernet.config = m.hypernet.config.replace(scale="global")
    assert torch.equal(m.hypernet.predict_rho(cond), torch.full((4,), 5.0))


def test_sampling_is_in_eval_mode(store_dir: str) -> None:
    m = _fitted(store_dir, steps=2, dropout=0.5)
    m.hypernet.train()
    cond, _ = m.conditioning(torch.randn(3, 10))
    a = m.generate(cond, rng=torch.Generator().manual_seed(0)).delta
    b = m.generate(cond, rng=torch.Generator().manual_seed(0)).delta
    assert torch.equal(a, b)  # dropout would make these differ
    assert m.hypernet.training  # the caller's mode is restored


def test_fit_resumes_from_its_checkpoint(store_dir: str, tmp_path, monkeypatch) -> None:
    args = ocdwrap.FitArgs(**FIT, steps=30, checkpoint_every=10)
    full = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(**SMALL))
    ocdwrap.fit(full, store_dir, args, checkpoint_dir=tmp_path / "a", progress=False)

    from ocdwrap.hypernet import OCDHyperNetwork

    calls = {"n": 0}
    original = OCDHyperNetwork.update_ema

    def crash_at_25(self, decay):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return original(self, decay)

    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(**SMALL))
    monkeypatch.setattr(OCDHyperNetwork, "update_ema", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        ocdwrap.fit(m, store_dir, args, checkpoint_dir=tmp_path / "b", progress=False)
    monkeypatch.setattr(OCDHyperNetwork, "update_ema", original)
    report = ocdwrap.fit(m, store_dir, args, checkpoint_dir=tmp_path / "b", progress=False)
    assert report.resumed_from == 20 and len(report.losses) == 30
    for (k, a), b in zip(full.hypernet.state_dict().items(), m.hypernet.state_dict().values()):
        assert torch.equal(a, b), k


def test_micro_batched_fit_step_equals_the_full_batch_step(store_dir: str) -> None:
    """Gradient accumulation over micro-batches gives the full batch's losses and gradients.

    (Weights after Adam steps are no fair comparison: Adam scales the float noise of gradients
    that are zero in exact arithmetic, e.g. a conv bias before a GroupNorm, up to lr-sized steps.)
    """
    from ocdwrap.fit import _accumulate, _Minibatches
    from ocdwrap.hypernet import new_hypernetwork
    from ocdwrap.store import load_training_data

    m = ocdwrap.wrap(mlp_case().make(), layer="fc2", config=ocdwrap.OCDConfig(**SMALL))
    store = ocdwrap.DeltaStore(store_dir)
    target, rho, cond = load_training_data(m, store, torch.device("cpu"))
    hyper = new_hypernetwork(m, target, rho, cond, seed=0)
    gen = torch.Generator().manual_seed(0)
    batch = _Minibatches(target, rho, cond, 16, slice(0, 16), gen, 1000)()
    results = {}
    for micro in (16, 5, 1):
        hyper.zero_grad(set_to_none=True)
        losses = _accumulate(hyper, batch, micro)
        grads = {n: p.grad.clone() for n, p in hyper.named_parameters() if p.grad is not None}
        results[micro] = (torch.stack(losses), grads)
    ref_losses, ref = results[16]
    assert len(ref) > 10 and sum(float(g.abs().sum()) for g in ref.values()) > 0
    for micro in (5, 1):
        losses, grads = results[micro]
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-7)
        assert grads.keys() == ref.keys()
        # absolute tolerance against the largest gradient: some are zero in exact arithmetic
        # (a conv bias before a GroupNorm) and hold only float noise
        scale = max(float(g.abs().max()) for g in ref.values())
        for k, g in ref.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-5 * scale, msg=k)


def test_automatic_micro_batch_keeps_unet_activations_small() -> None:
    from ocdwrap.fit import MICRO_BATCH_BYTES, _micro_batch
    from ocdwrap.hypernet import OCDHyperNetwork

    cfg = ocdwrap.OCDConfig(delta="full")  # the default UNet (32, 64, 64)
    hyper = OCDHyperNetwork(cfg, kind="linear", weight_shape=(84, 120), dims=(120, 84, 10))
    per_sample = 32 * 84 * 120 * 4  # the first level, full resolution
    assert hyper.net.net.activation_bytes() == per_sample
    micro = _micro_batch(hyper, 128, None)
    assert micro == MICRO_BATCH_BYTES // per_sample and micro * per_sample <= MICRO_BATCH_BYTES
    rank1 = OCDHyperNetwork(
        ocdwrap.OCDConfig(delta="rank1"), kind="linear", weight_shape=(84, 120), dims=(120, 84, 10)
    )
    assert _micro_batch(rank1, 128, None) == 128  # the MLP path runs in one pass


def test_fit_says_how_long_a_full_matrix_fit_on_a_cpu_will_take(
    store_dir: str, monkeypatch, caplog
) -> None:
    """After its first step, a CPU fit of the full-matrix UNet that will run past the threshold
    says how long it expects to take and what to choose instead; rank-one fits say nothing."""
    import importlib

    fit_mod = importlib.import_module("ocdwrap.fit")  # the module: ocdwrap.fit is the function
    monkeypatch.setattr(fit_mod, "SLOW_FIT_SECONDS", 0.0)
    with caplog.at_level("WARNING", logger="ocdwrap"):
        _fitted(store_dir, steps=3, delta="full")
    said = [r.getMessage() for r in caplog.records if "full-matrix UNet on a CPU" in r.getMessage()]
    assert len(said) == 1 and "3 steps will take about" in said[0]
    assert "delta='auto'" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ocdwrap"):
        _fitted(store_dir, steps=3, delta="rank1")
    assert not [r for r in caplog.records if "full-matrix" in r.getMessage()]
