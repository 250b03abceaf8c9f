"""The networks of the hypernetwork (the diffusion process itself lives in ``hypernet.py``).

* ``CondEncoder``: e = E_i(i_L) + E_a(a_L) + E_o(f(x)), one Linear + SiLU per signal.
* ``UNetDenoiser`` (the paper's "full" path): diffusers' ``UNet2DModel`` over the normalised
  delta as a one-channel image, zero-padded to a multiple of 2^(levels-1) and cropped back;
  the conditioning vector is added to the timestep embedding (``class_embed_type="identity"``).
* ``MLPDenoiser`` (the rank-one path): a residual MLP over the out-sized factor, with the
  same timestep + conditioning embedding added in every block; without timesteps, the
  regression control.
* ``ConditionalNet``: an encoder plus one of the two; ``ScaleModel``: rho(I(x)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import OCDConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding PE(t), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.float().unsqueeze(1) * freqs.unsqueeze(0)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class CondEncoder(nn.Module):
    """e = E_i(i_L) + E_a(a_L) + E_o(f(x)): one Linear + SiLU per (standardised) signal, summed."""

    def __init__(self, dims: tuple[int, int, int], emb_dim: int) -> None:
        super().__init__()
        self.enc = nn.ModuleList(nn.Sequential(nn.Linear(d, emb_dim), nn.SiLU()) for d in dims)

    def forward(self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return sum(e(f) for e, f in zip(self.enc, feats))


class ResBlock(nn.Module):
    """Pre-norm residual MLP block with an additive embedding.

    ``forward`` takes the embedding already through ``self.emb`` (its owner computes it: once
    per row while training, split into a per-sample and a per-step part while sampling)."""

    def __init__(self, hidden: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb = nn.Linear(emb_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        z = self.fc1(F.silu(self.norm(h))) + emb  # emb = self.emb(e), (B or 1, hidden)
        return h + self.fc2(self.drop(F.silu(z)))


class MLPDenoiser(nn.Module):
    """epsilon(x_t, t, c) for vectors x (B, dim); also the regressor when ``timesteps=False``."""

    def __init__(
        self,
        dim: int,
        emb_dim: int,
        hidden: int,
        n_blocks: int,
        dropout: float,
        timesteps: bool = True,
    ) -> None:
        super().__init__()
        self.emb_dim = emb_dim
        self.timesteps = timesteps
        if timesteps:
            self.t_mlp = nn.Sequential(
                nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
            )
            self.inp = nn.Linear(dim, hidden)
        else:
            self.inp = nn.Linear(emb_dim, hidden)
        self.blocks = nn.ModuleList(ResBlock(hidden, emb_dim, dropout) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def condition(self, c: torch.Tensor) -> torch.Tensor:
        """The per-sample part of every block's embedding, W_k c + b_k: (n_blocks, B, hidden).

        A block adds W_k (t_emb + c) + b_k; Linear is affine, so while sampling the part in c
        is computed once per sample and only W_k t_emb (one row per step) at every step.
        """
        return torch.stack([block.emb(c) for block in self.blocks])

    def forward(
        self,
        x: torch.Tensor | None,
        t: torch.Tensor | None,
        c: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """epsilon (or the regressed target), (B, dim). ``cond``: :meth:`condition` of ``c``,
        precomputed once for all the steps of one sampling loop."""
        if not self.timesteps:  # regression: the prediction from the conditioning alone
            h = self.inp(c)
            embs = [block.emb(c) for block in self.blocks]
        else:
            te = self.t_mlp(timestep_embedding(t, self.emb_dim).to(c.dtype))  # (B or 1, emb)
            h = self.inp(x.flatten(1))
            if cond is None:  # training: one timestep per row
                embs = [block.emb(te + c) for block in self.blocks]
            else:
                embs = [p + F.linear(te, b.emb.weight) for p, b in zip(cond, self.blocks)]
        for block, emb in zip(self.blocks, embs):
            h = block(h, emb)
        return self.out(F.silu(self.norm(h)))


class UNetDenoiser(nn.Module):
    """epsilon(x_t, t, c) for matrices x (B, H, W) with diffusers' UNet2DModel."""

    def __init__(
        self,
        shape: tuple[int, int],
        channels: tuple[int, ...],
        layers_per_block: int,
        attention: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        levels = len(channels)
        # a multiple of 2^(levels-1), and at least 2 so GroupNorm never sees a single element
        self.mult = max(2 ** (levels - 1), 2)
        self.padded = padded_shape(self.shape, self.mult)
        if levels > 1 and all(p == self.mult for p in self.padded):
            # the deepest level would be 1 x 1, where a GroupNorm group of one channel sees one
            # value (an error in torch): one more multiple of height keeps it at 2 x 1
            self.padded = (2 * self.mult, self.padded[1])
        n_attn = min(2, levels - 1) if attention else 0
        down = ["DownBlock2D"] * (levels - n_attn) + ["AttnDownBlock2D"] * n_attn
        up = ["AttnUpBlock2D"] * n_attn + ["UpBlock2D"] * (levels - n_attn)
        groups = math.gcd(*channels) if levels > 1 else channels[0]
        self.emb_dim = channels[0] * 4
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(
            sample_size=self.padded,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(channels),
            layers_per_block=layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            class_embed_type="identity",
            norm_num_groups=min(32, groups),
            dropout=dropout,
            add_attention=attention,
            attention_head_dim=8,
        )

    def activation_bytes(self) -> int:
        """Bytes of the largest float32 activation one sample makes (the first level's)."""
        H, W = self.padded
        channels = self.unet.config.block_out_channels
        return max(c * (H >> i) * (W >> i) * 4 for i, c in enumerate(channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        img = pad_to(rearrange(x, "b h w -> b 1 h w"), self.padded)  # (B, 1, Hp, Wp)
        out = self.unet(img, t, class_labels=c).sample  # (B, 1, Hp, Wp)
        return crop(rearrange(out, "b 1 h w -> b h w"), self.shape)  # (B, H, W)


def pad_to(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad the last two dims of ``x`` at the end up to ``shape``."""
    H, W = x.shape[-2:]
    return F.pad(x, (0, shape[1] - W, 0, shape[0] - H))


def padded_shape(shape: tuple[int, ...], mult: int) -> tuple[int, ...]:
    """Each size of ``shape`` rounded up to a multiple of ``mult``."""
    return tuple(-(-int(s) // mult) * mult for s in shape)


def crop(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Crop the last two dims of ``x`` back to ``shape``."""
    return x[..., : shape[0], : shape[1]]


class ConditionalNet(nn.Module):
    """A conditioning encoder plus a denoiser (or regressor) network."""

    def __init__(
        self,
        config: OCDConfig,
        dims: tuple[int, int, int],
        target_shape: tuple[int, ...],
        diffusion: bool,
    ) -> None:
        super().__init__()
        if len(target_shape) == 2 and diffusion:
            self.net = UNetDenoiser(
                target_shape,
                config.unet_channels,
                config.unet_layers_per_block,
                config.unet_attention,
                config.dropout,
            )
            emb = self.net.emb_dim
        else:
            emb = config.cond_dim
            self.net = MLPDenoiser(
                math.prod(target_shape),
                emb,
                config.mlp_hidden,
                config.mlp_layers,
                config.dropout,
                timesteps=diffusion,
            )
        self.encoder = CondEncoder(dims, emb)
        self.target_shape = tuple(target_shape)

    def embed(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.encoder(feats)

    def condition(self, c: torch.Tensor) -> torch.Tensor | None:
        """What the denoiser can compute from ``c`` once for all sampling steps (or None)."""
        if isinstance(self.net, MLPDenoiser) and self.net.timesteps:
            return self.net.condition(c)
        return None

    def forward(
        self,
        x: torch.Tensor | None,
        t: torch.Tensor | None,
        c: torch.Tensor,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = self.net(x, t, c) if cond is None else self.net(x, t, c, cond)
        return out.reshape(c.shape[0], *self.target_shape)


class ScaleModel(nn.Module):
    """rho(I(x)) = rho_mean * exp(z(I(x))): positive, with no upper cap; z starts at 0."""

    def __init__(self, dims: tuple[int, int, int], hidden: int, n_blocks: int) -> None:
        super().__init__()
        self.inp = nn.Linear(sum(dims), hidden)
        self.blocks = nn.Sequential(
            *[
                nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))
                for _ in range(max(n_blocks - 1, 0))
            ]
        )
        self.out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        h = self.blocks(self.inp(torch.cat(feats, dim=1)))
        return self.out(torch.nn.functional.silu(h)).squeeze(1).clamp(-20, 20)
