"""The synthesised speech data (speakers, disjoint sentences, 8 kHz, LibriMix-style mixtures,
cached), the MulCat separator and its permutation-invariant SI-SDR loss, the clear errors for bad
audio, and a ``--smoke`` run of ``python -m benchmarks.speech`` with every row.

Everything that synthesises speech is skipped, with the reason, where espeak-ng is absent."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from benchmarks import speech_data
from benchmarks.speech_data import (
    SAMPLE_RATE,
    SPLITS,
    EspeakMissingError,
    SpeechDataError,
    check_audio,
    load_speech,
    make_speakers,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_espeak = pytest.mark.skipif(
    not speech_data.espeak_available(),
    reason="espeak-ng is not installed (apt-get install espeak-ng, or bash scripts/setup.sh as "
    "root): the speech benchmark synthesises its speakers with it",
)
SMALL = dict(
    utterances={"train": 12, "val": 6, "test": 6, "test_unseen": 6},
    mixtures={"train": 8, "val": 3, "test": 3, "test_unseen": 3},
    n_seen=6,
    n_unseen=5,
    seconds=0.5,
)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    if not speech_data.espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    directory = str(tmp_path_factory.mktemp("speech"))
    return load_speech(**SMALL, directory=directory), directory


@needs_espeak
def test_data_is_cached_and_read_back_without_synthesis(small, monkeypatch) -> None:
    data, directory = small
    assert not data.cached and data.seconds > 0 and data.nbytes > 10_000
    assert os.path.dirname(data.path) == directory and data.path.endswith("-v1.npz")

    def no_synthesis(*args, **kwargs):
        raise AssertionError("the second load synthesised speech again")

    monkeypatch.setattr(speech_data, "synthesize", no_synthesis)
    again = load_speech(**SMALL, directory=directory)
    assert again.cached and again.seconds == pytest.approx(data.seconds)  # the stored time
    assert torch.equal(again.utterances, data.utterances)
    for split in SPLITS:
        for s in (2, 5):
            m1, s1 = data.mixtures(split, s)
            m2, s2 = again.mixtures(split, s)
            assert torch.equal(m1, m2) and torch.equal(s1, s2)
    summary = again.summary()
    assert summary["sample_rate"] == SAMPLE_RATE and summary["file_mb"] > 0
    assert summary["mixtures"]["train/5"] == 8 and summary["utterances"]["test_unseen"] == 6


@needs_espeak
def test_mixtures_are_sums_of_distinct_speakers_at_librimix_levels(small) -> None:
    data, _ = small
    for split in SPLITS:
        for S in (2, 5):
            mix, src = data.mixtures(split, S)
            n = SMALL["mixtures"][split]
            assert mix.shape == (n, SAMPLE_RATE // 2) and src.shape == (n, S, SAMPLE_RATE // 2)
            assert torch.allclose(mix, src.sum(1), atol=1e-6)
            assert float(mix.abs().max()) <= speech_data.PEAK + 1e-4  # peak-limited
            spk = data.utt_speaker[data.mix_index[(split, S)]]
            assert all(len(set(row.tolist())) == S for row in spk)  # S different speakers
            level = 10 * torch.log10(src.pow(2).mean(-1))
            assert float(level.max()) <= speech_data.LEVEL_DB[1] + 0.1  # a source is never louder
            assert float(level.min()) >= speech_data.LEVEL_DB[0] - 15  # than -25 dB


@needs_espeak
def test_splits_have_disjoint_sentences_and_unseen_speakers(small) -> None:
    data, _ = small
    split_of = data.utt_split.tolist()
    sent = {
        s: {data.sentences[i] for i, k in enumerate(split_of) if k == j}
        for j, s in enumerate(SPLITS)
    }
    assert sum(len(v) for v in sent.values()) == len(data.sentences)  # every sentence once
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not sent[a] & sent[b]
    spk = {s: set(data.utt_speaker[data.utt_split == j].tolist()) for j, s in enumerate(SPLITS)}
    assert not spk["train"] & spk["test_unseen"] and spk["test"] <= spk["train"]
    train_variants = {data.speakers[i].variant for i in spk["train"]}
    assert not train_variants & {data.speakers[i].variant for i in spk["test_unseen"]}
    # speakers sound different: utterances of two speakers differ in level-normalised spectrum
    u = data.utterances
    assert float((u[0] - u[1]).abs().mean()) > 0.1


def test_speakers_are_seeded_and_distinct() -> None:
    seen, unseen = make_speakers(20, 6, seed=3)
    assert (seen, unseen) == make_speakers(20, 6, seed=3)
    assert len({(s.voice, s.variant) for s in seen + unseen}) == 26
    assert all(25 <= s.pitch <= 75 and 140 <= s.speed <= 200 for s in seen + unseen)
    with pytest.raises(SpeechDataError, match="at most 30 such speakers"):
        make_speakers(2, 31, seed=0)


def test_bad_audio_raises_clear_errors() -> None:
    with pytest.raises(SpeechDataError, match="16000 Hz.*resample_poly"):
        check_audio(torch.zeros(2, 16000), 16000)
    with pytest.raises(SpeechDataError, match=r"2 channels.*mono"):
        check_audio(torch.zeros(4, 2, 8000), SAMPLE_RATE)
    with pytest.raises(SpeechDataError, match="shorter than the model's receptive window of 400"):
        check_audio(np.zeros((1, 100)), SAMPLE_RATE, min_samples=400)
    check_audio(torch.zeros(3, 8000), SAMPLE_RATE, min_samples=400)  # fine


def test_missing_espeak_names_the_fix(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(speech_data.shutil, "which", lambda name: None)
    assert not speech_data.espeak_available()
    with pytest.raises(EspeakMissingError, match=r"apt-get install espeak-ng.*scripts/setup.sh"):
        load_speech(**SMALL, directory=str(tmp_path))
