"""``OCDHyperNetwork``: the conditional generator of per-input deltas and the scale model.

It holds
* the standardisation statistics of the conditioning signals (from the collection),
* the generator: a conditional denoiser epsilon_Omega (``generator="diffusion"``) or a
  regressor of the normalised delta (``generator="regression"``, the no-diffusion control),
  plus an EMA copy of it that is used for generation,
* the scale model rho(I(x)) (``scale="learned"``) or the training set's mean rho (``"global"``).

Targets are the normalised deltas delta / rho_s: the full matrix (out, in·kh·kw) for
``delta="full"``, or the out-sized left factor u of delta ≈ rho u vᵀ for ``delta="rank1"``,
where v is the layer input (SGD) or its sign (Adam) and so follows from the input itself, or
for ``delta="lowrank"`` the r canonical factor pairs of delta / rho_s = sum_k s_k u_k v_kᵀ packed
into one vector [u (r·out), s (r), v (r·in')] (:func:`pack_lowrank`), standardised per
coordinate. ``delta="auto"`` is resolved against the collection by :func:`ocdwrap.fit` before a
hypernetwork is built; the hypernetwork records what it generates in its spec.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .capture import Conditioning
from .config import OCDConfig, SamplingConfig
from .deltas import DeltaSpec, FullDelta, LowRankDelta, Rank1Delta, rank1_right_factor
from .errors import BaseModelMismatchError, ConfigError
from .networks import ConditionalNet, ScaleModel


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode inside (no dropout), each submodule's own mode restored after.

    Costs nothing when everything is already in eval mode (``Module.train()`` walks and sets
    every submodule, which at batch 1 took longer than the whole denoising loop).
    """
    training, stack = [], [module]
    while stack:  # not Module.modules(), which builds every submodule's name on each call
        m = stack.pop()
        if m.training:
            training.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True


_SAMPLING = SamplingConfig()  # the sampling defaults


def make_scheduler(config: OCDConfig, sampler: str | None = None):
    """A fresh diffusers scheduler for ``sampler`` ('ddim' or 'ddpm') with the config's schedule."""
    # imported here: diffusers takes seconds to import, and `import ocdwrap` (the CLI) need not
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule="linear",
        clip_sample=config.clip_sample,
        prediction_type="epsilon",
    )
    sampler = sampler or _SAMPLING.sampler
    if sampler == "ddim":
        return DDIMScheduler(**kw, set_alpha_to_one=True, timestep_spacing="leading")
    if sampler == "ddpm":
        return DDPMScheduler(**kw, variance_type="fixed_small", timestep_spacing="leading")
    raise ValueError(f"Unknown sampler {sampler!r}; choose 'ddim' or 'ddpm'.")


def _ddim_table(config: OCDConfig, steps: int, device: torch.device) -> list[tuple]:
    """Deterministic DDIM (eta = 0): per step, the timestep and the four scalars of diffusers'
    ``DDIMScheduler.step``, computed the way it computes them (so the samples are identical),
    once per schedule instead of once per step and call."""
    sched = make_scheduler(config, "ddim")
    sched.set_timesteps(steps)
    table = []
    for t in sched.timesteps.tolist():
        prev = t - config.num_train_timesteps // sched.num_inference_steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        # x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t);  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        coeffs = ((1 - a_t) ** 0.5, a_t**0.5, a_prev**0.5, (1 - a_prev) ** 0.5)
        table.append((torch.tensor(t, device=device), coeffs))
    return table


def scale_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The paper's relative loss in dB: mean of 10·log10((rho - rho_s)^2 / rho_s^2 + 1e-8)."""
    return (10 * torch.log10((pred - target) ** 2 / target**2 + 1e-8)).mean()


def pack_lowrank(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Low-rank factors u (N, r, out), s (N, r), v (N, r, in') as one vector each, (N, D).

    D = r·out + r + r·in'; :func:`unpack_lowrank` inverts it.

    Example:
        >>> x = pack_lowrank(u, s, v)
        >>> u2, s2, v2 = unpack_lowrank(x, rank=u.shape[1], out=u.shape[2])
    """
    n = u.shape[0]
    return torch.cat([u.reshape(n, -1), s, v.reshape(n, -1)], dim=1)  # (N, D)


def unpack_lowrank(
    x: torch.Tensor, rank: int, out: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`pack_lowrank`: (N, D) -> u (N, r, out), s (N, r), v (N, r, in')."""
    n = x.shape[0]
    u = x[:, : rank * out].reshape(n, rank, out)  # (N, r, out)
    s = x[:, rank * out : rank * (out + 1)]  # (N, r)
    v = x[:, rank * (out + 1) :].reshape(n, rank, -1)  # (N, r, in')
    return u, s, v


class OCDHyperNetwork(nn.Module):
    """Generator of per-input deltas for one target layer. Built by :func:`ocdwrap.fit`.

    ``delta`` and ``delta_rank`` say what it generates when they differ from the config's (the
    resolution of ``config.delta="auto"``, or a rank capped at the layer's size).
    """

    def __init__(
        self,
        config: OCDConfig,
        *,
        kind: str,
        weight_shape: tuple[int, ...],
        dims: tuple[int, int, int],
        delta: str | None = None,
        delta_rank: int | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.dims = tuple(int(d) for d in dims)
        self.config = _resolved_config(config, self.weight_shape, delta, delta_rank)
        self.delta = self.config.delta
        out, inner = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if self.delta == "rank1":
            self.target_shape: tuple[int, ...] = (out,)
        elif self.delta == "lowrank":
            self.target_shape = (self.config.delta_rank * (out + 1 + inner),)
        else:
            self.target_shape = (out, inner)
        diffusion = config.generator == "diffusion"
        self.net = ConditionalNet(config, self.dims, self.target_shape, diffusion)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.scale = ScaleModel(self.dims, config.mlp_hidden, config.mlp_layers)
        for i, d in enumerate(self.dims):
            self.register_buffer(f"cond_mean{i}", torch.zeros(d))
            self.register_buffer(f"cond_std{i}", torch.ones(d))
        self.register_buffer("rho_mean", torch.ones(()))
        self.register_buffer("target_std", torch.ones(()))
        if self.delta == "lowrank":  # per-coordinate standardisation of the packed factors
            self.register_buffer("target_mean", torch.zeros(self.target_shape))
            self.register_buffer("target_scale", torch.ones(self.target_shape))
        # the training schedule's cumulative alphas (recomputed from the config, never saved)
        alphas = make_scheduler(config).alphas_cumprod.to(torch.float32)
        self.register_buffer("alphas_cumprod", alphas, persistent=False)
        self._ddim_cache: dict[tuple, list[tuple]] = {}  # read-only tables, safe across threads

    # --- (de)serialisation --------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        spec = {"kind": self.kind, "weight_shape": list(self.weight_shape), "dims": list(self.dims)}
        spec["delta"] = self.delta
        if self.delta == "lowrank":
            spec["delta_rank"] = self.config.delta_rank
        return spec

    @classmethod
    def from_spec(cls, config: OCDConfig, spec: dict[str, Any]) -> OCDHyperNetwork:
        # adapters saved before the spec named its delta generate config.delta
        return cls(
            config,
            kind=spec["kind"],
            weight_shape=tuple(spec["weight_shape"]),
            dims=tuple(spec["dims"]),
            delta=spec.get("delta"),
            delta_rank=spec.get("delta_rank"),
        )

    @property
    def rank(self) -> int:
        """Factor pairs per generated delta: 1 for rank1, delta_rank for lowrank, 0 for full."""
        return {"rank1": 1, "lowrank": self.config.delta_rank}.get(self.delta, 0)

    # --- statistics ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_statistics(self, cond: Conditioning, rho: torch.Tensor, target: torch.Tensor) -> None:
        """Standardisation of the conditioning, the global scale and the target's spread."""
        for i, t in enumerate((cond.layer_input, cond.layer_output, cond.model_output)):
            getattr(self, f"cond_mean{i}").copy_(t.mean(0))
            getattr(self, f"cond_std{i}").copy_(
                t.std(0, unbiased=False).clamp_min(1e-6)
                if t.shape[0] > 1
                else torch.ones_like(t[0])
            )
        self.rho_mean.copy_(rho.mean())
        if self.delta == "lowrank":
            # the factors differ in size by coordinate (s_k ~ sqrt(numel), u_k and v_k entries
            # ~ 1/sqrt(width)); a near-constant coordinate is floored, not blown up
            std = target.std(0, unbiased=False)  # (D,)
            floor = 1e-6 * float(std.square().mean().sqrt()) + 1e-20
            self.target_mean.copy_(target.mean(0))
            self.target_scale.copy_(std.clamp_min(floor))
            return
        self.target_std.copy_(target.std(unbiased=False).clamp_min(1e-8))

    def _to_unit(self, target: torch.Tensor) -> torch.Tensor:
        """Stored target -> the generator's standardised space."""
        if self.delta == "lowrank":
            return (target - self.target_mean) / self.target_scale
        return target / self.target_std

    def _from_unit(self, x: torch.Tensor) -> torch.Tensor:
        """The generator's standardised space -> a stored target (float32)."""
        if self.delta == "lowrank":
            return (x * self.target_scale + self.target_mean).float()
        return (x * self.target_std).float()

    def features(self, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ts = (cond.layer_input, cond.layer_output, cond.model_output)
        dtype = self.cond_mean0.dtype  # float32 unless the hypernetwork was cast on purpose
        return tuple(
            (t.to(dtype) - getattr(self, f"cond_mean{i}")) / getattr(self, f"cond_std{i}")
            for i, t in enumerate(ts)
        )

    # --- training losses ---------------------------------------------------------------------------
    def forward(
        self,
        target: torch.Tensor,
        cond_in: torch.Tensor,
        cond_act: torch.Tensor,
        cond_out: torch.Tensor,
        rho: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fit losses of one minibatch: (generator loss, scale loss; 0 for a global scale).

        Takes plain tensors (not a :class:`Conditioning`) so that DistributedDataParallel can
        wrap the hypernetwork as it is.
        """
        cond = Conditioning(cond_in, cond_act, cond_out)
        loss = self.generator_loss(target, cond, t, noise)
        if self.config.scale != "learned":
            return loss, loss.new_zeros(())
        return loss, self.scale_loss(rho, cond)

    def generator_loss(
        self,
        target: torch.Tensor,
        cond: Conditioning,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """MSE of the epsilon prediction at timesteps ``t`` (diffusion) or of the delta (regression)."""
        x0 = self._to_unit(target)
        c = self.net.embed(self.features(cond))
        if self.config.generator == "regression":
            return ((self.net(None, None, c) - x0) ** 2).mean()
        a = self.alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        return ((self.net(xt, t, c) - noise) ** 2).mean()

    def scale_loss(self, rho: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return scale_loss(self.predict_rho(cond), rho)

    def predict_rho(self, cond: Conditioning, scale: str | None = None) -> torch.Tensor:
        """rho(I(x)), (B,); ``scale="global"`` gives the training set's mean rho instead."""
        return self._rho(self.features(cond), scale)

    def _rho(self, feats: tuple[torch.Tensor, ...], scale: str | None) -> torch.Tensor:
        """:meth:`predict_rho` from the standardised features (:meth:`features`)."""
        if (scale or self.config.scale) == "global":
            return self.rho_mean.float().expand(feats[0].shape[0])
        return (self.rho_mean * torch.exp(self.scale(feats))).float()

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        for pe, p in zip(self.ema.parameters(), self.net.parameters()):
            pe.lerp_(p, 1 - decay)
        for be, b in zip(self.ema.buffers(), self.net.buffers()):
            be.copy_(b)

    # --- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_normalised(
        self,
        cond: Conditioning,
        *,
        num_draws: int = 1,
        rng: torch.Generator | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
    ) -> torch.Tensor:
        """Normalised deltas (B*num_draws, *target_shape), sample-major, from the EMA network
        (``sampler``, ``steps``, ``eta``: :class:`~ocdwrap.SamplingConfig`'s defaults when None)."""
        with _eval_mode(self):  # no dropout while sampling
            return self._sample(self.features(cond), num_draws, rng, sampler, steps, eta)

    def _sample(
        self,
        feats: tuple[torch.Tensor, ...],
        num_draws: int,
        rng: torch.Generator | None,
        sampler: str | None,
        steps: int | None,
        eta: float | None,
    ) -> torch.Tensor:
        """:meth:`sample_normalised` from the standardised features (:meth:`features`)."""
        if num_draws > 1:
            feats = tuple(f.repeat_interleave(num_draws, 0) for f in feats)
        c = self.ema.embed(feats)  # once per sample, not once per step
        n = c.shape[0]
        if self.config.generator == "regression":
            return self._from_unit(self.ema(None, None, c))
        sampler = sampler or _SAMPLING.sampler
        steps = steps or _SAMPLING.sampling_steps
        eta = _SAMPLING.eta if eta is None else eta
        x = torch.randn((n, *self.target_shape), generator=rng, device=c.device, dtype=c.dtype)
        if sampler == "ddim" and eta == 0 and not self.config.clip_sample:
            cfg = self.config
            key = (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, steps, str(c.device))
            if key not in self._ddim_cache:
                self._ddim_cache[key] = _ddim_table(cfg, steps, c.device)
            cond = self.ema.condition(c)  # the per-sample part of the embeddings, once
            for t, (s_noise, s_signal, s_prev, s_dir) in self._ddim_cache[key]:
                # one timestep for the whole batch: broadcast, not repeated per row
                eps = self.ema(x, t.view(1), c, cond)
                x = s_prev * ((x - s_noise * eps) / s_signal) + s_dir * eps
        else:
            sched = make_scheduler(self.config, sampler)
            sched.set_timesteps(steps, device=c.device)
            cond = self.ema.condition(c)
            for t in sched.timesteps:
                eps = self.ema(x, t.view(1), c, cond)
                if sampler == "ddim":
                    x = sched.step(eps, t, x, eta=eta, generator=rng).prev_sample
                else:
                    x = sched.step(eps, t, x, generator=rng).prev_sample
        return self._from_unit(x)

    @torch.no_grad()
    def generate(
        self,
        cond: Conditioning,
        *,
        num_draws: int = 1,
        scale: str | None = None,
        rng: torch.Generator | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
    ) -> DeltaSpec:
        """Per-sample deltas rho(I(x)) * delta_hat, ``num_draws`` per sample (sample-major).

        ``scale`` overrides ``config.scale`` ("learned" or "global"); ``rng``, ``sampler``,
        ``steps`` and ``eta`` as for :meth:`sample_normalised`.
        """
        with _eval_mode(self):  # no dropout while sampling
            feats = self.features(cond)  # once, for the generator and the scale model
            x = self._sample(feats, num_draws, rng, sampler, steps, eta)
            rho = self._rho(feats, scale)
        if num_draws > 1:
            rho = rho.repeat_interleave(num_draws, 0)
        n = x.shape[0]
        if self.delta == "rank1":
            v = rank1_right_factor(cond.layer_input.float(), self.config.overfit_optimizer)
            return Rank1Delta(rho.unsqueeze(1) * x, v.repeat_interleave(num_draws, 0))
        if self.delta == "lowrank":
            u, s, v = unpack_lowrank(x, self.config.delta_rank, self.weight_shape[0])
            if self.config.generator == "diffusion":
                # a draw should be a valid factorisation, and stored u_k, v_k are unit vectors: an
                # imperfect denoiser overshoots their length (7x after 2,000 steps on LeNet5's
                # conv2), so the size of each term comes from s_k alone. The regressor's
                # prediction is a conditional mean, whose shorter vectors are the right hedge.
                u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)  # (n, r, out)
                v = v / v.norm(dim=2, keepdim=True).clamp_min(1e-12)  # (n, r, in')
            return LowRankDelta(u, rho.unsqueeze(1) * s, v)  # (n, r, out), (n, r), (n, r, in')
        return FullDelta((rho.view(n, 1, 1) * x).reshape(n, *self.weight_shape))


def _resolved_config(
    config: OCDConfig,
    weight_shape: tuple[int, ...],
    delta: str | None,
    delta_rank: int | None,
) -> OCDConfig:
    """``config`` itself, or a copy naming the concrete delta (and rank) it generates."""
    delta = delta or config.delta
    if delta == "auto":
        raise ConfigError(
            "delta='auto' picks rank1 or lowrank from what the collection holds; build the "
            "hypernetwork with ocdwrap.fit(model, store) (or pass delta='rank1'/'lowrank' here)."
        )
    if delta == "lowrank":
        rank = int(delta_rank) if delta_rank is not None else config.delta_rank
        rank = config.replace(delta="lowrank", delta_rank=rank).lowrank_rank(weight_shape)
    else:
        rank = config.delta_rank
    if delta == config.delta and rank == config.delta_rank:
        return config
    return config.replace(delta=delta, delta_rank=rank)


# --- building one for a model ----------------------------------------------------------------
def resolve_delta(
    config: OCDConfig,
    weight_shape: tuple[int, ...],
    layer: str,
    held: dict[str, int],
    where: str,
) -> tuple[str, int]:
    """The parameterisation (and rank) ``config`` asks of a collection that ``held``
    (:func:`ocdwrap.store.held_deltas`: {parameterisation: rank}); an error if absent.

    ``delta="auto"`` asks for rank1 where the collection holds the exact rank-one factors (a
    Linear on one vector per sample), else lowrank with ``delta_rank`` capped at the layer's size.
    A collection made with another ``delta`` (or another rank) is a
    :class:`BaseModelMismatchError` naming both and the fix, never a silent substitute.

    Example:
        >>> resolve_delta(OCDConfig(delta="auto"), (16, 6, 5, 5), "conv2", {"lowrank": 4}, "d/")
        ('lowrank', 4)
    """
    cfg = config
    want = cfg.delta
    if want == "auto":
        want = "rank1" if "rank1" in held else "lowrank"
    if want == "lowrank":
        rank = cfg.lowrank_rank(weight_shape, layer)
    else:
        rank = 1 if want == "rank1" else 0
    if held.get(want) == rank:
        return want, rank
    has = ", ".join(f"lowrank rank {r}" if k == "lowrank" else k for k, r in held.items())
    asks = f"lowrank rank {rank}" if want == "lowrank" else want
    made = "lowrank" if "lowrank" in held else ("full" if "full" in held else "rank1")
    fix = f"delta={made!r}" + (f", delta_rank={held['lowrank']}" if "lowrank" in held else "")
    raise BaseModelMismatchError(
        f"The collection in {where} holds {has} deltas (collected with "
        f"delta={made!r}), but this model's config (delta={cfg.delta!r}, "
        f"delta_rank={cfg.delta_rank}) asks for {asks}. Fit with the collection's setting, "
        f"OCDConfig({fix}), or collect again with this config into another out_dir."
    )


def new_hypernetwork(
    model: Any,
    target: torch.Tensor,
    rho: torch.Tensor,
    cond: Conditioning,
    seed: int,
    *,
    held: dict[str, int] | None = None,
) -> OCDHyperNetwork:
    """A fresh hypernetwork for ``model`` (an :class:`~ocdwrap.OCDModel`): initial weights
    from ``seed``, statistics from the data.

    ``held`` (what the collection ``target`` came from holds, :func:`ocdwrap.store.held_deltas`)
    resolves ``delta="auto"``; without it the config's own ``delta`` is built.

    Example:
        >>> target, rho, cond = load_training_data(model, store, torch.device("cpu"))
        >>> hyper = new_hypernetwork(model, target, rho, cond, seed=0, held=held_deltas(store))
    """
    dims = (cond.layer_input.shape[1], cond.layer_output.shape[1], cond.model_output.shape[1])
    delta, rank = None, None
    if held is not None:
        delta, rank = resolve_delta(
            model.config, model.weight_shape, model.layer_name, held, "the collection"
        )
    with torch.random.fork_rng(devices=[]):  # the initial weights follow `seed`, not global state
        torch.manual_seed(seed)
        hyper = OCDHyperNetwork(
            model.config,
            kind=model.layer_kind,
            weight_shape=model.weight_shape,
            dims=dims,
            delta=delta,
            delta_rank=rank or None,
        ).to(target.device)
    hyper.set_statistics(cond, rho, target)
    hyper.ema.load_state_dict(hyper.net.state_dict())
    return hyper


def continued_hypernetwork(
    model: Any, target: torch.Tensor, cond: Conditioning, where: str
) -> OCDHyperNetwork:
    """``model``'s loaded hypernetwork, to be trained further, after checking that it fits the
    collection in ``where`` (``target`` and ``cond`` read from it)."""
    hyper = model.hypernet
    dims = (cond.layer_input.shape[1], cond.layer_output.shape[1], cond.model_output.shape[1])
    if tuple(hyper.dims) != dims or tuple(hyper.target_shape) != tuple(target.shape[1:]):
        raise BaseModelMismatchError(
            f"The loaded hypernetwork generates {tuple(hyper.target_shape)} deltas from "
            f"conditioning of widths {tuple(hyper.dims)}, but the collection in {where} "
            f"holds {tuple(target.shape[1:])} deltas with conditioning widths {dims}. Continue "
            "fitting on a collection made like the one it was fitted on, or fit a fresh one "
            "(from_pretrained without is_trainable=True)."
        )
    return hyper
