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


def test_separator_shapes_loss_and_errors() -> None:
    from benchmarks.speech_model import Separator, mixture_sisdr, pit_neg_sisdr, separate

    torch.manual_seed(0)
    model = Separator(3, channels=8, hidden=8, kernel=16, chunk=10).eval()
    seen = []
    model.proj.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    x = torch.randn(2, 1000)
    with torch.no_grad():
        est = model(x)
        alone = model(x[1:])
    assert est.shape == (2, 3, 1000)
    assert seen[0][0] == 2 and seen[0][2] == 8  # proj sees (B, frames, N): the batch in dim 0
    assert torch.allclose(est[1], alone[0], atol=1e-5)  # mixtures do not mix
    src = torch.randn(2, 3, 1000)
    loss = pit_neg_sisdr(src[:, [2, 0, 1]] + 0.01 * torch.randn_like(src), src)
    assert loss.shape == (2,) and bool((loss < -30).all())  # the assignment undoes the order
    assert bool((pit_neg_sisdr(src[:, [1, 2, 0]], src) < -90).all())  # exact, in any order
    ref = mixture_sisdr(src)  # 3 equal-level sources: about -3 dB each
    assert ref.shape == (2,) and bool(((ref > -6) & (ref < 0)).all())
    with pytest.raises(SpeechDataError, match="shorter than the model's receptive window"):
        model(torch.zeros(2, model.receptive_window - 1))
    with pytest.raises(SpeechDataError, match="2 channels"):
        model(torch.zeros(2, 2, 1000))
    with pytest.raises(SpeechDataError, match="44100 Hz"):
        separate(model, torch.zeros(1, 1000), 44100)
    assert separate(model, torch.zeros(1000), SAMPLE_RATE).shape == (1, 3, 1000)


def test_a_step_budget_trains_the_same_base_whatever_the_time() -> None:
    from benchmarks.speech_model import Separator, train_separator

    g = torch.Generator().manual_seed(0)
    train = (torch.randn(12, 800, generator=g), torch.randn(12, 2, 800, generator=g))
    val = (torch.randn(4, 800, generator=g), torch.randn(4, 2, 800, generator=g))

    def trained(seconds: float) -> tuple[dict, dict]:
        torch.manual_seed(0)
        model = Separator(2, channels=8, hidden=8, kernel=16, chunk=10)
        kw = dict(max_steps=5, batch_size=4, patience=10, filterbank_steps=2)
        info = train_separator(model, train, val, seconds=seconds, **kw)
        return info, model.state_dict()

    fast, slow = trained(1e-9), trained(1e9)  # a budget of 5 steps: the seconds are ignored
    assert fast[0]["steps"] == slow[0]["steps"] == 5 and fast[0]["epochs_run"] == 2
    assert fast[0]["budget_steps"] == 5
    for k, v in fast[1].items():
        assert torch.equal(v, slow[1][k]), k


def test_draws_are_put_in_the_reference_speaker_order() -> None:
    from benchmarks.speech import to_order_of

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 3, 400, generator=g)
    perms = ([2, 0, 1], [0, 1, 2], [1, 2, 0])
    draws = torch.stack([ref[:, p] + 0.05 * torch.randn(2, 3, 400, generator=g) for p in perms])
    aligned = to_order_of(draws, ref)
    assert aligned.shape == draws.shape
    for k in range(3):  # every draw's speakers back in the reference's order
        assert float((aligned[k] - ref).abs().max()) < 0.5 < float((draws[0] - ref).abs().max())


@needs_espeak
def test_smoke_run_reports_every_row(tmp_path) -> None:
    import json
    import math
    import subprocess
    import sys

    from benchmarks.speech import rows_for

    out = tmp_path / "out.json"
    argv = ["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")]
    argv += ["--cache-dir", str(tmp_path / "speech"), "--plots", str(tmp_path / "figs")]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speech", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| base MulCat separator |" in proc.stdout and "| row |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m benchmarks.speech --smoke")
    part = data["datasets"]["2spk"]
    assert list(part["rows"]) == [r.key for r in rows_for(2, 4, 1e-3, 10)]
    rows = part["per_seed"]["0"]
    assert set(rows) == set(part["rows"])
    for key, metrics in rows.items():
        assert set(metrics) == {"sisdri", "sisdri_unseen"}, key
        assert all(math.isfinite(v) for v in metrics.values()), key
    for metric in ("sisdri", "sisdri_unseen"):  # the upper bound beats the base on both splits
        assert rows["overfit"][metric] > rows["base"][metric]
    info = part["info"]["0"]
    assert info["ocd"]["collect_summary"]["count"] == 12  # every collected mixture
    assert info["ocd"]["config"]["delta"] == "lowrank" and info["ocd"]["layer"] == "proj"
    cfg = info["ocd"]["config"]  # the waveforms read as (B, speakers, T), pooled to time cells
    assert (cfg["output_layout"], cfg["output_grid"]) == ("sequence_channels_first", 8)
    timing = info["ocd"]["inference_s_per_mixture"]  # the rows' sampling steps and the library's
    assert set(timing["by_steps"]) == {"10", "2"} and timing["ocd"] > 0
    assert timing["ratio"] == timing["by_steps"]["10"]["ratio"]
    hr = info["headroom"]  # ocdwrap.headroom on validation mixtures, a regression-type loss
    assert hr["task"] == "regression" and hr["n"] == 4 and hr["layer"] == "proj"
    assert {"base", "overfit", "probe", "probe_mixture"} <= set(hr["rows"])
    assert info["selection"]["proj_rank"] >= 1 and info["compute_matched"]["steps"] > 0
    assert 50 < data["peak_rss_mb"] < 8 * 1024  # the memory bound
    assert data["data"]["sample_rate"] == 8000 and data["data"]["mixtures"]["train/2"] == 16
    assert rows_for(5, 4, 1e-3, 10)[0].paper == {"sisdri": "12.7"}
    assert (tmp_path / "figs" / "speech-2spk-spectrograms.png").stat().st_size > 5_000
    assert (tmp_path / "figs" / "results-speech-2spk.png").stat().st_size > 10_000
    # the shared rows are ocdwrap.compare's, on both test splits at once: each split's SI-SDRi
    # through its metrics=; the alternative layer's rows its own comparison's ocd and overfit
    comparison = info["ocd"]["comparison"]
    assert comparison["n"] == 8  # 4 seen-speaker + 4 unseen-speaker test mixtures
    for key in ("base", "overfit", "ocd", "ocd_k", "regression", "nearest", "probe", "global"):
        assert rows[key] == comparison["rows"][key]["metrics"], key
    assert rows["alt"] == info["alt"]["comparison"]["rows"]["ocd"]["metrics"]
    assert rows["alt_overfit"] == info["alt"]["comparison"]["rows"]["overfit"]["metrics"]

    # --merge: two runs' JSONs (here the same run, its seed relabelled) make one table of both
    second = json.loads(out.read_text())
    for field in ("per_seed", "info"):
        second["datasets"]["2spk"][field] = {"1": second["datasets"]["2spk"][field]["0"]}
    other = tmp_path / "seed1.json"
    other.write_text(json.dumps(second))
    merged_path = tmp_path / "merged.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speech", "--merge", str(out), str(other),
         "--json", str(merged_path)],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(merged_path.read_text())
    table = merged["datasets"]["2spk"]
    assert sorted(table["per_seed"]) == ["0", "1"] and merged["settings"]["seeds"] == [0, 1]
    assert table["rows"]["base"]["metrics"]["sisdri"]["n"] == 2
    assert merged["data"]["sample_rate"] == 8000 and "seeds [0, 1]" in proc.stdout
    proc = subprocess.run(  # the same seed twice is an error, not a silent replacement
        [sys.executable, "-m", "benchmarks.speech", "--merge", str(out), str(out),
         "--json", str(tmp_path / "twice.json")],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode != 0 and "2spk seed 0 is in two runs" in proc.stderr


def test_runs_as_a_file_too() -> None:
    """``python benchmarks/speech.py`` (the issue's form) as well as ``python -m``."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "speech.py"), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--speakers" in proc.stdout


def test_separator_splits_at_proj_for_ocd() -> None:
    """torch.fx traces the separator, so ocdwrap runs the encoder and the dual-path blocks once
    per OCD forward (and per collected batch) and only ``proj`` onwards per pass; the split's
    output equals the separator's own."""
    from benchmarks.speech_model import Separator
    from ocdwrap.split import SplitModel

    torch.manual_seed(0)
    model = Separator(2, channels=8, hidden=8, kernel=16, chunk=8).eval()
    split = SplitModel(model, "proj")
    x = 0.05 * torch.randn(3, 800)
    assert split.verify((x,), {}, lambda: model(x))
    assert len(split.suffix_nodes) < len(split.prefix_nodes) / 4  # proj and what follows it
