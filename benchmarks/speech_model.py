"""A small MulCat / Gated-LSTM speech separator and its permutation-invariant SI-SDR loss.

The separator follows Nachmani, Adi & Wolf (2020), "Voice Separation with an Unknown Number of
Multiple Speakers" (the network of the paper's Table 5), at a size two CPU cores train in
minutes:

* ``encoder``: Conv1d(1, N, L, stride L/2) + ReLU, the waveform to N-channel frames;
* ``blocks``: the frames cut into chunks of K frames with 50 % overlap (the dual-path layout);
  each block runs one MulCat step along the chunk (intra-chunk) and one across chunks
  (inter-chunk). A MulCat step: two bi-LSTMs over the same sequence, each followed by a Linear,
  multiplied element-wise (the gate), concatenated with the step's input and projected back to
  N channels by a Linear (``proj``), plus a residual connection and group norm;
* ``proj``: after overlap-adding the chunks back to (B, frames, N), a PReLU and the final
  projection ``nn.Linear(N, S * N)`` whose input is the sequence (B, frames, N): one mask per
  speaker. **This is the layer OCD adapts** (see ``benchmarks/speech.py``);
* ``decoder``: each speaker's masked encoder frames back to a waveform (ConvTranspose1d).

``Separator(S)(mixture (B, T)) -> estimates (B, S, T)``. The loss of every row is
:func:`pit_neg_sisdr`: the negative SI-SDR (zero-mean, in dB) of the estimates under the best
assignment of estimates to sources, one value per mixture, computed with torchmetrics'
``permutation_invariant_training`` and ``scale_invariant_signal_distortion_ratio`` (speaker-wise,
the assignment by ``scipy.optimize.linear_sum_assignment`` for 3 or more speakers).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .speech_data import SAMPLE_RATE, SpeechDataError, check_audio


def _sisdr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

    return scale_invariant_signal_distortion_ratio(preds, target, zero_mean=True)


def pit_sisdr(estimates: torch.Tensor, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(SI-SDR in dB (B,) averaged over speakers under the best assignment, that assignment (B, S))."""
    from torchmetrics.functional.audio import permutation_invariant_training

    if estimates.shape != sources.shape:
        raise SpeechDataError(
            f"estimates {tuple(estimates.shape)} and sources {tuple(sources.shape)} differ: the "
            "separator must output one waveform per source, (B, S, T)"
        )
    return permutation_invariant_training(
        estimates, sources, _sisdr, mode="speaker-wise", eval_func="max"
    )


def pit_neg_sisdr(estimates: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """The per-mixture loss (B,): minus the permutation-matched SI-SDR (dB)."""
    return -pit_sisdr(estimates, sources)[0]


@torch.no_grad()
def mixture_sisdr(sources: torch.Tensor) -> torch.Tensor:
    """SI-SDR (B,) of the mixture itself against each source, averaged over sources: the
    reference an SI-SDR improvement (SI-SDRi) is measured from."""
    mix = sources.sum(1, keepdim=True).expand_as(sources)
    return _sisdr(mix, sources).mean(1)


class MulCat(nn.Module):
    """One MulCat step over sequences (N', L, C): two bi-LSTMs (value and gate), each followed by
    a Linear, multiplied, concatenated with the input, projected back to C (``proj``)."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.rnn = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.gate_rnn = nn.LSTM(channels, hidden, batch_first=True, bidirectional=True)
        self.lin = nn.Linear(2 * hidden, channels)
        self.gate_lin = nn.Linear(2 * hidden, channels)
        self.proj = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(self.rnn(x)[0]) * self.gate_lin(self.gate_rnn(x)[0])
        return self.proj(torch.cat([y, x], -1))


class DualPathBlock(nn.Module):
    """An intra-chunk and an inter-chunk MulCat step with residuals and group norm on chunked
    features (B, C, R, K): R chunks of K frames."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.intra, self.inter = MulCat(channels, hidden), MulCat(channels, hidden)
        self.norm1, self.norm2 = nn.GroupNorm(1, channels), nn.GroupNorm(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, R, K = x.shape[0], x.shape[1], x.shape[2], x.shape[3]  # (no unpacking: fx traces it)
        h = x.permute(0, 2, 3, 1).reshape(B * R, K, C)  # along each chunk
        h = self.intra(h).reshape(B, R, K, C).permute(0, 3, 1, 2)
        x = x + self.norm1(h)
        h = x.permute(0, 3, 2, 1).reshape(B * K, R, C)  # across chunks
        h = self.inter(h).reshape(B, K, R, C).permute(0, 3, 2, 1)
        return x + self.norm2(h)


class Separator(nn.Module):
    """MulCat / Gated-LSTM separator: (B, T) mixtures at 8 kHz -> (B, S, T) estimates.

    ``channels`` N, ``hidden`` LSTM width per direction, ``kernel`` L encoder window (samples),
    ``chunk`` K frames per chunk, ``blocks`` dual-path blocks.
    """

    def __init__(
        self,
        n_speakers: int,
        *,
        channels: int = 64,
        hidden: int = 64,
        kernel: int = 16,
        chunk: int = 50,
        blocks: int = 2,
    ) -> None:
        super().__init__()
        self.n_speakers, self.channels, self.kernel, self.chunk = (
            n_speakers,
            channels,
            kernel,
            chunk,
        )
        self.stride = kernel // 2
        self.sample_rate = SAMPLE_RATE
        self.encoder = nn.Conv1d(1, channels, kernel, stride=self.stride, bias=False)
        self.norm = nn.GroupNorm(1, channels)
        self.blocks = nn.ModuleList([DualPathBlock(channels, hidden) for _ in range(blocks)])
        self.act = nn.PReLU()
        self.proj = nn.Linear(channels, n_speakers * channels)
        self.decoder = nn.ConvTranspose1d(channels, 1, kernel, stride=self.stride, bias=False)
        with torch.no_grad():  # every mask starts near 1 / S: each estimate near mixture / S
            self.proj.weight.mul_(0.1)
            self.proj.bias.fill_(1.0 / n_speakers)

    def autoencode(self, mixture: torch.Tensor) -> torch.Tensor:
        """The mixture through the encoder and decoder alone (every mask 1)."""
        T = mixture.shape[-1]
        w = nn.functional.relu(self.encoder(_pad_for_frames(mixture, self.kernel, self.stride)))
        return self.decoder(w)[:, 0, :T]

    @property
    def receptive_window(self) -> int:
        """Samples one chunk spans: the shortest mixture the separator takes."""
        return (self.chunk - 1) * self.stride + self.kernel

    def forward(self, mixture: torch.Tensor) -> torch.Tensor:
        # written so that torch.fx traces it (shapes read by index, the Python arithmetic on them
        # inside fx-wrapped helpers): ocdwrap's split forward then runs the encoder and the
        # dual-path blocks once per OCD forward and per collected batch, not once per pass
        mixture = _checked_mixture(mixture, self.receptive_window)
        B, T = mixture.shape[0], mixture.shape[1]
        w = nn.functional.relu(self.encoder(_pad_for_frames(mixture, self.kernel, self.stride)))
        frames = w.shape[2]
        h = _to_chunks(self.norm(w), self.chunk)  # (B, C, R, K)
        for block in self.blocks:
            h = block(h)
        h = _from_chunks(h, frames).transpose(1, 2)  # (B, frames, C)
        masks = torch.relu(self.proj(self.act(h)))  # (B, frames, S * C)
        masks = masks.reshape(B, frames, self.n_speakers, self.channels).permute(0, 2, 3, 1)
        y = (masks * w.unsqueeze(1)).reshape(B * self.n_speakers, self.channels, frames)
        return self.decoder(y).reshape(B, self.n_speakers, -1)[..., :T]


@torch.fx.wrap
def _checked_mixture(mixture: torch.Tensor, min_samples: int) -> torch.Tensor:
    """``mixture`` if it is a batch of 8 kHz mono mixtures (B, T) of at least ``min_samples``
    samples, else a :class:`SpeechDataError` naming the fix."""
    check_audio(mixture, SAMPLE_RATE, what="the mixture", min_samples=min_samples)
    if mixture.dim() != 2:
        raise SpeechDataError(
            f"the separator takes a batch of mono mixtures (B, T); got shape "
            f"{tuple(mixture.shape)}: add the batch dimension (x[None])"
        )
    return mixture


@torch.fx.wrap
def _pad_for_frames(mixture: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """(B, T) -> (B, 1, T'): padded at the end so the encoder's frames cover every sample."""
    pad = (-(mixture.shape[-1] - kernel)) % stride
    return nn.functional.pad(mixture, (0, pad)).unsqueeze(1)


@torch.fx.wrap
def _to_chunks(x: torch.Tensor, K: int) -> torch.Tensor:
    """(B, C, F) frames -> (B, C, R, K): R chunks of K frames, 50 % overlap, padded so that
    every frame lies in two chunks."""
    F, hop = x.shape[-1], K // 2
    n = max(math.ceil((F - K) / hop), 0) + 1
    x = nn.functional.pad(x, (hop, (n - 1) * hop + K - F + hop))
    return x.unfold(2, K, hop)


@torch.fx.wrap
def _from_chunks(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of :func:`_to_chunks`: overlap-add (B, C, R, K) back to (B, C, frames)."""
    B, C, R, K = x.shape
    hop = K // 2
    out = nn.functional.fold(
        x.permute(0, 1, 3, 2).reshape(B, C * K, R),
        output_size=(1, (R - 1) * hop + K),
        kernel_size=(1, K),
        stride=(1, hop),
    ).reshape(B, C, -1)
    return out[..., hop : hop + frames] / 2  # each frame is covered by two chunks


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate_separator(
    model: nn.Module, mixtures: torch.Tensor, sources: torch.Tensor, batch: int = 16
) -> float:
    """Mean SI-SDR improvement (dB) of ``model`` on the given mixtures."""
    model.eval()
    total = 0.0
    for i in range(0, len(mixtures), batch):
        est = model(mixtures[i : i + batch])
        total += float(
            (
                -pit_neg_sisdr(est, sources[i : i + batch]) - mixture_sisdr(sources[i : i + batch])
            ).sum()
        )
    return total / len(mixtures)


def pretrain_filterbank(
    model: Separator, mixtures: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int
) -> float:
    """Encoder and decoder trained alone to reconstruct mixtures (SI-SDR), a few hundred cheap
    steps: the separator then starts from a filterbank that can represent speech, not from the
    long plateau near 0 dB a random one gives. Returns the final reconstruction SI-SDR (dB)."""
    params = [*model.encoder.parameters(), *model.decoder.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    sisdr = torch.tensor(float("nan"))
    for _ in range(steps):
        x = mixtures[torch.randint(len(mixtures), (batch_size,), generator=g)]
        sisdr = _sisdr(model.autoencode(x), x).mean()
        opt.zero_grad(set_to_none=True)
        (-sisdr).backward()
        opt.step()
    return float(sisdr.detach())


def train_separator(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    *,
    seconds: float,
    max_steps: int | None = None,
    max_epochs: int = 200,
    patience: int = 5,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    log: Any = None,
    filterbank_steps: int = 0,
    filterbank_lr: float = 2e-3,
) -> dict[str, Any]:
    """Adam on the permutation-invariant negative SI-SDR, one pass over the training mixtures
    per epoch, until ``seconds`` of wall time or ``max_epochs`` epochs; early stopping on the
    validation loss with ``patience`` epochs; the best epoch's weights are kept (eval mode).
    At least one step and one validation pass run, whatever the budget.
    ``max_steps``: a budget of optimizer steps instead of ``seconds`` (the time is then not
    looked at): the same base whatever the machine's load (a run that stopped by time after N
    steps is reproduced by ``max_steps=N``).
    ``filterbank_steps`` > 0 first runs :func:`pretrain_filterbank` (inside the budget)."""
    g = torch.Generator().manual_seed(seed)
    t_fb = time.perf_counter()
    fb = None
    if filterbank_steps:
        fb = pretrain_filterbank(
            model,
            train[0],
            steps=filterbank_steps,
            batch_size=batch_size,
            lr=filterbank_lr,
            seed=seed,
        )
        if log:
            log(f"  filterbank: reconstruction SI-SDR {fb:.1f} dB after {filterbank_steps} steps")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, best_epoch, bad, epochs, steps = math.inf, None, 0, 0, 0, 0
    history: list[float] = []
    t0 = t_fb
    stopped_early = False

    def spent() -> bool:
        if max_steps is not None:
            return steps >= max_steps
        return time.perf_counter() - t0 > seconds

    while epochs < max_epochs and (epochs == 0 or not spent()):
        model.train()
        order = torch.randperm(len(train[0]), generator=g)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = pit_neg_sisdr(model(train[0][idx]), train[1][idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            steps += 1
            if spent():
                break
        epochs += 1
        val_loss = -evaluate_separator(model, *val) if len(val[0]) else float(loss)
        history.append(val_loss)
        if log:
            log(
                f"  epoch {epochs}: val SI-SDRi {-val_loss:.2f} dB ({time.perf_counter() - t0:.0f} s)"
            )
        if val_loss < best - 1e-3:
            best, best_state, best_epoch, bad = (
                val_loss,
                copy.deepcopy(model.state_dict()),
                epochs,
                0,
            )
        else:
            bad += 1
            if bad >= patience:
                stopped_early = True
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {
        "epochs_run": epochs,
        "best_epoch": best_epoch,
        "stopped_early": stopped_early,
        "best_val_sisdri": -best,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
        "budget_s": seconds,
        "budget_steps": max_steps,
        "batch_size": batch_size,
        "lr": lr,
        "val_history_sisdri": [-v for v in history],
        "filterbank_steps": filterbank_steps,
        "filterbank_sisdr": fb,
    }


def separate(model: Separator, audio: Iterable | torch.Tensor, sample_rate: int) -> torch.Tensor:
    """Estimates (B, S, T) of mono mixtures ``audio`` recorded at ``sample_rate`` (checked)."""
    x = torch.as_tensor(audio, dtype=torch.float32)
    check_audio(x, sample_rate, what="the mixture", min_samples=model.receptive_window)
    with torch.no_grad():
        return model(x if x.dim() == 2 else x.unsqueeze(0))
