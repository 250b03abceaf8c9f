"""The fault-injection suite: every fault ocdwrap guards its files against, and what it guarantees.

1. a process killed with SIGKILL at random (seeded) moments during ``collect``, ``fit`` with a
   checkpoint directory and ``save_pretrained(overwrite=True)``;
2. a crash (an exception nothing may swallow) at every single write of each of them;
3. a write the system refuses part-way (``RLIMIT_FSIZE`` in a child process, SIGXFSZ ignored);
4. two processes collecting into one directory at once, on the same data and on different data;
5. one byte flipped, one digit changed or the file truncated, in every kind of file ocdwrap writes.

Each test asserts the outcome: a resumed collection equals an uninterrupted one tensor for
tensor, a resumed fit ends with the same weights and losses, an adapter loads and predicts exactly
like the old one or the new one (never an error, never a mix), a damaged file is refused naming
it. docs/reliability.md lists every fault with its test.

The subprocesses run this file as a script (see ``_worker``), with torch on one thread; this
process computes the references on one thread too, so results match bit for bit.
"""

from __future__ import annotations

import errno
import importlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import flip_byte, make_mlp
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
    _truncate,
    _wrap,
    _xy,
)
from safetensors import safe_open

import ocdwrap
from ocdwrap.errors import CollectionBusyError, CollectionExistsError, CorruptFileError
from ocdwrap.io import ADAPTER_FILES_NAME, CONFIG_NAME, SAMPLING_NAME, WEIGHTS_NAME, read_json

KILL_SEEDS = (0, 1, 2)  # three random moments per kind of work
KILL_N, KILL_BATCH, KILL_SHARD = 320, 8, 32
KILL_STEPS, KILL_EVERY = 24, 3  # fit steps, checkpoint every 3
STALL = 12  # the workers stop making progress here, so a kill always lands before the end
FIT_CFG = dict(**SMALL, delta="rank1")
FIT_KILL = dict(**FIT, checkpoint_every=KILL_EVERY)  # the FitArgs of FIT_CFG's fits
RACE_CFG = dict(shard_size=16)
RACE_N = 48


@pytest.fixture(scope="module", autouse=True)
def _torch_on_one_thread():
    """This file's work runs on one thread, as its subprocesses do: the results compare bit for
    bit, and a crowded machine does not slow two threads down more than one."""
    with _one_thread():
        yield


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> str:
    """A complete collection (full deltas: every key) of the 48 samples of ``_loader()``."""
    d = tmp_path_factory.mktemp("faults-store")
    with _one_thread():
        ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, **SHARD, progress=False)
    return str(d)


def _assert_same_collection(got: ocdwrap.DeltaStore, want: ocdwrap.DeltaStore) -> None:
    """Tensor for tensor, summary and files: ``got`` is what a single clean run stored."""
    assert got.complete and len(got) == len(want)
    a, b = want.load(), got.load()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert got.manifest["summary"] == want.manifest["summary"]
    assert got.manifest["shards"] == want.manifest["shards"]
    assert sorted(os.listdir(got.directory)) == sorted(os.listdir(want.directory))


# ---------------------------------------------------------------------------------------------
# adapters: an OLD and a NEW one whose configs differ in the denoiser's width
# ---------------------------------------------------------------------------------------------
@dataclass
class Adapters:
    dirs: dict[str, Path]
    models: dict[str, ocdwrap.OCDModel]
    outputs: dict[str, torch.Tensor]  # with sampling(seed=0) on ``x``
    hidden: dict[str, int]
    x: torch.Tensor


@pytest.fixture(scope="module")
def adapters(store_dir: str, tmp_path_factory) -> Adapters:
    root = tmp_path_factory.mktemp("faults-adapters")
    x = _xy(6, seed=5)[0]
    ad = Adapters({}, {}, {}, {"old": 16, "new": 24}, x)
    for name, hidden in ad.hidden.items():
        m = _wrap(**{**FIT_CFG, "mlp_hidden": hidden})
        ocdwrap.fit(m, store_dir, ocdwrap.FitArgs(**FIT, steps=2), progress=False)
        ad.dirs[name] = Path(m.save_pretrained(root / name))
        ad.models[name] = ocdwrap.OCDModel.from_pretrained(make_mlp(), ad.dirs[name])
        with ad.models[name].sampling(seed=0):
            ad.outputs[name] = ad.models[name](x)
    assert not torch.equal(ad.outputs["old"], ad.outputs["new"])
    return ad


def _which(directory: Path, ad: Adapters) -> str:
    """Load the adapter in ``directory`` (any error fails the test) and say whether it predicts
    exactly like the old one or the new one, with its own config (never a mix)."""
    model = ocdwrap.OCDModel.from_pretrained(make_mlp(), directory)
    with model.sampling(seed=0):
        out = model(ad.x)
    for name, want in ad.outputs.items():
        if torch.equal(out, want):
            assert model.config.mlp_hidden == ad.hidden[name]
            return name
    pytest.fail(f"the adapter in {directory} predicts like neither the old nor the new one")


# ---------------------------------------------------------------------------------------------
# subprocess workers
# ---------------------------------------------------------------------------------------------
def _start_worker(log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, __file__, *args],
            env=env,
            cwd=str(ROOT),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for(path: Path, procs: list[subprocess.Popen], log: Path, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while not path.exists():
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(
                    f"a worker ended (rc {proc.returncode}) before {path.name}:\n"
                    + log.read_text(errors="replace")
                )
        if time.monotonic() > deadline:
            for proc in procs:
                proc.kill()
            pytest.fail(f"no {path.name} after {timeout} s:\n" + log.read_text(errors="replace"))
        time.sleep(0.002)


class _Doomed:
    """The ``what`` workers of every kill seed, started at once (they load while the others
    work), each waiting for its go file: :meth:`kill` starts one and kills it with SIGKILL a
    random (seeded) time into its work. Any still running at the end are killed."""

    def __init__(self, what: str, span: float, tmp_path: Path, args_of) -> None:
        self.what, self.span, self.dir = what, span, tmp_path
        self.procs = {}
        for seed in KILL_SEEDS:
            go, started, log = self._files(seed)
            self.procs[seed] = _start_worker(log, what, str(go), str(started), *args_of(seed))

    def _files(self, seed: int) -> tuple[Path, Path, Path]:
        return tuple(self.dir / f"{self.what}-{seed}.{x}" for x in ("go", "started", "log"))

    def __enter__(self) -> _Doomed:
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def kill(self, seed: int) -> float:
        delay = random.Random(f"{self.what}-{seed}").uniform(0.0, self.span)
        go, started, log = self._files(seed)
        proc = self.procs[seed]
        go.touch()
        _wait_for(started, [proc], log)
        time.sleep(delay)
        if proc.poll() is not None:
            pytest.fail(f"the {self.what} worker ended before the kill:\n" + log.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        return delay


def _await(go: Path, timeout: float = 600.0) -> None:
    """The worker side of the go file (a worker nobody starts goes away by itself)."""
    deadline = time.monotonic() + timeout
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no {go} after {timeout} s")
        time.sleep(0.001)


def _kill_data():
    return _loader(KILL_N, KILL_BATCH)


def _worker(argv: list[str]) -> None:
    """The subprocess side. The SIGKILL workers are slowed down so a kill can land anywhere, and
    stall after ``STALL`` batches or steps so it always lands before the end, however loaded
    the machine is."""
    torch.set_num_threads(1)
    task, args = argv[0], argv[1:]
    if task in ("collect", "fit", "save"):  # go, started, ...: see _Doomed
        go, started, args = Path(args[0]), Path(args[1]), args[2:]
    if task == "collect":  # out_dir
        model = _wrap()

        def slow():
            for i, batch in enumerate(_kill_data()):
                time.sleep(600 if i == STALL else 0.03)  # 12 batches: 3 shards of 32 written
                yield batch

        _await(go)
        started.touch()
        ocdwrap.collect(model, slow(), CE, args[0], shard_size=KILL_SHARD, progress=False)
    elif task == "fit":  # store, checkpoint_dir
        from ocdwrap.hypernet import OCDHyperNetwork

        original = OCDHyperNetwork.update_ema
        calls = {"n": 0}

        def slow_ema(self, decay):
            calls["n"] += 1
            time.sleep(600 if calls["n"] == STALL else 0.03)  # checkpoints 3, 6, 9 written
            return original(self, decay)

        OCDHyperNetwork.update_ema = slow_ema
        model = _wrap(**FIT_CFG)
        _await(go)
        started.touch()
        ocdwrap.fit(
            model,
            args[0],
            ocdwrap.FitArgs(**FIT_KILL, steps=KILL_STEPS),
            checkpoint_dir=args[1],
            progress=False,
        )
    elif task == "save":  # old, new, target: save new and old over target, in turn
        old, new = (ocdwrap.OCDModel.from_pretrained(make_mlp(), d) for d in args[0:2])
        _await(go)
        started.touch()
        while True:
            new.save_pretrained(args[2], overwrite=True)
            old.save_pretrained(args[2], overwrite=True)
    elif task == "fsize":
        _refused_writes(Path(args[0]))
    elif task == "race":
        _race(Path(args[0]), args[1])
    else:
        raise SystemExit(f"unknown worker task {task!r}")


# ---------------------------------------------------------------------------------------------
# 1. killed with SIGKILL at random moments
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_collect_killed_at_random_moments_resumes_to_the_same_collection(tmp_path) -> None:
    with _one_thread():
        full = ocdwrap.collect(
            _wrap(), _kill_data(), CE, tmp_path / "full", progress=False, shard_size=KILL_SHARD
        )
    with _Doomed("collect", 0.6, tmp_path, lambda seed: [str(tmp_path / f"killed-{seed}")]) as w:
        for seed in KILL_SEEDS:
            part = tmp_path / f"killed-{seed}"
            w.kill(seed)
            if (part / "manifest.json").exists():  # the commit point is never torn
                assert not read_json(str(part / "manifest.json"))["complete"]
            with _one_thread():
                resumed = ocdwrap.collect(
                    _wrap(), _kill_data(), CE, part, progress=False, shard_size=KILL_SHARD
                )
            _assert_same_collection(resumed, full)  # no temporary file of a killed write is left


@pytest.mark.slow
def test_fit_killed_at_random_moments_resumes_to_the_same_model(store_dir: str, tmp_path) -> None:
    with _one_thread():
        full = _wrap(**FIT_CFG)
        reference = ocdwrap.fit(
            full, store_dir, ocdwrap.FitArgs(**FIT_KILL, steps=KILL_STEPS), progress=False
        )
    with _Doomed(
        "fit", 1.5, tmp_path, lambda seed: [store_dir, str(tmp_path / f"ckpt-{seed}")]
    ) as w:
        for seed in KILL_SEEDS:
            ckpt = tmp_path / f"ckpt-{seed}"
            w.kill(seed)
            killed_at = 0
            if (ckpt / "fit_checkpoint.json").exists():  # the commit point is never torn
                killed_at = read_json(str(ckpt / "fit_checkpoint.json"))["step"]
                assert killed_at < KILL_STEPS and killed_at % KILL_EVERY == 0
            with _one_thread():
                resumed = _wrap(**FIT_CFG)
                report = ocdwrap.fit(
                    resumed,
                    store_dir,
                    ocdwrap.FitArgs(**FIT_KILL, steps=KILL_STEPS),
                    checkpoint_dir=ckpt,
                    progress=False,
                )
            assert report.resumed_from == killed_at
            assert report.losses == reference.losses
            a, b = full.hypernet.state_dict(), resumed.hypernet.state_dict()
            for k in a:
                assert torch.equal(a[k], b[k]), (seed, k)


@pytest.mark.slow
def test_adapter_save_killed_at_random_moments_leaves_the_old_or_the_new(
    adapters: Adapters, tmp_path
) -> None:
    dirs = [str(adapters.dirs[n]) for n in ("old", "new")]
    for seed in KILL_SEEDS:
        _copy_store(adapters.dirs["old"], tmp_path / f"adapter-{seed}")
    with _Doomed(
        "save", 0.3, tmp_path, lambda seed: [*dirs, str(tmp_path / f"adapter-{seed}")]
    ) as w:
        for seed in KILL_SEEDS:
            target = tmp_path / f"adapter-{seed}"
            w.kill(seed)
            assert _which(target, adapters) in ("old", "new")
            # what the kill left does not stand in the way of the next saves
            for name in ("new", "old"):
                adapters.models[name].save_pretrained(target, overwrite=True)
                assert _which(target, adapters) == name


# ---------------------------------------------------------------------------------------------
# 2. a crash at every single write
# ---------------------------------------------------------------------------------------------
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
    collect_module = importlib.import_module("ocdwrap.store_writer")  # it makes every write
    with _one_thread():
        full = ocdwrap.collect(
            _wrap(), _loader(), CE, tmp_path / "f", progress=False, shard_size=16
        )
        reference = full.load()
        for k in range(1, 9):  # 48 samples in shards of 16: 8 writes (manifests and shards)
            with monkeypatch.context() as mp:
                _crash_at(mp, collect_module, k, after)
                with pytest.raises(_Crash):
                    ocdwrap.collect(
                        _wrap(), _loader(), CE, tmp_path / str(k), progress=False, shard_size=16
                    )
            manifest = tmp_path / str(k) / "manifest.json"
            if manifest.exists():  # every manifest written, the first included, is checked
                assert "checksum" in read_json(str(manifest)), k
            # what a kill in the middle of a write leaves (a crash cleans it up, a kill cannot)
            (tmp_path / str(k) / ".tmp-killed").write_bytes(b"half a shard")
            store = ocdwrap.collect(
                _wrap(), _loader(), CE, tmp_path / str(k), progress=False, shard_size=16
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
    fit_module = importlib.import_module("ocdwrap.fit_checkpoint")  # it writes the checkpoints
    cfg = dict(**SMALL, delta="rank1")
    reference = _wrap(**cfg)
    ocdwrap.fit(
        reference, store_dir, ocdwrap.FitArgs(**FIT, checkpoint_every=2, steps=5), progress=False
    )
    for k in range(1, 5):  # two checkpoints (steps 2 and 4) of two files each
        ckpt = tmp_path / str(k)
        with monkeypatch.context() as mp:
            _crash_at(mp, fit_module, k, after)
            with pytest.raises(_Crash):
                ocdwrap.fit(
                    _wrap(**cfg),
                    store_dir,
                    ocdwrap.FitArgs(**FIT, checkpoint_every=2, steps=5),
                    checkpoint_dir=ckpt,
                    progress=False,
                )
        m = _wrap(**cfg)
        ocdwrap.fit(
            m, store_dir, ocdwrap.FitArgs(**FIT, steps=5), checkpoint_dir=ckpt, progress=False
        )
        for key, v in reference.hypernet.state_dict().items():
            assert torch.equal(v, m.hypernet.state_dict()[key]), (k, key)


class _OsWithReplace:
    """The ``os`` module as ocdwrap.io sees it, with ``replace`` swapped (and ``fsync`` a no-op:
    it guards against a power cut, which these crashes are not, and it is slow on a busy disk)."""

    def __init__(self, replace) -> None:
        self.replace = replace

    @staticmethod
    def fsync(fd: int) -> None:
        pass

    def __getattr__(self, name: str):
        return getattr(os, name)


def _crash_at_event(monkeypatch, k: int, after: bool) -> None:
    """Crash just before or after the k-th write or rename of ocdwrap.io: every file it writes
    (``_atomic_write_bytes``: the staged adapter files and the commit point) and every
    ``os.replace`` (a written file put in place, a staged file renamed to its final name)."""
    import ocdwrap.io as io

    count = {"n": 0}

    def counted(call):
        def step(*a, **kw):
            count["n"] += 1
            n = count["n"]
            if n == k and not after:
                raise _Crash
            out = call(*a, **kw)
            if n == k:
                raise _Crash
            return out

        return step

    monkeypatch.setattr(io, "_atomic_write_bytes", counted(io._atomic_write_bytes))
    monkeypatch.setattr(io, "os", _OsWithReplace(counted(os.replace)))


def _save_crashing(model: ocdwrap.OCDModel, target: Path, monkeypatch, k: int, after: bool):
    """Save ``model`` over ``target`` with a crash at event ``k``; False when the save has fewer
    events (it completed)."""
    with monkeypatch.context() as mp:
        _crash_at_event(mp, k, after)
        try:
            model.save_pretrained(target, overwrite=True)
        except _Crash:
            return True
    return False


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_adapter_save_crashed_at_every_write_leaves_the_old_or_the_new(
    adapters: Adapters, tmp_path, monkeypatch, after: bool
) -> None:
    seen = []
    k = 1
    while True:
        target = _copy_store(adapters.dirs["old"], tmp_path / f"k{k}")
        if not _save_crashing(adapters.models["new"], target, monkeypatch, k, after):
            break
        seen.append(_which(target, adapters))
        k += 1
    # n files staged, the commit point, n renames: 3n + 2 events with the renames inside the
    # writes; the commit point divides them: the old adapter before it, the new one after
    n = len(read_json(str(adapters.dirs["new"] / ADAPTER_FILES_NAME))["files"])
    assert n >= 2 and k - 1 == 3 * n + 2, (n, k)
    assert seen[0] == "old" and seen[-1] == "new", seen
    first_new = seen.index("new")
    assert seen == ["old"] * first_new + ["new"] * (len(seen) - first_new), seen
    if after:
        return  # the states after event k are those before event k + 1: checked once below
    # from each of those states, a save of the old adapter crashed at any write: old or new,
    # and a save that completes gives the adapter saved
    found: dict[frozenset, str] = {}  # what a directory of this content loads as

    def which(d: Path) -> str:
        content = frozenset((f, (d / f).read_bytes()) for f in os.listdir(d))
        if content not in found:
            found[content] = _which(d, adapters)
        return found[content]

    # the states a crash leaves: which files are there, and whether the commit point is the old
    # one (two saves of one model differ in bytes: safetensors orders the metadata at random)
    old_commit = (adapters.dirs["old"] / ADAPTER_FILES_NAME).read_bytes()
    states = set()
    for k1 in range(1, k):
        state = tmp_path / f"k{k1}"  # what the crash at k1 left
        files = frozenset(os.listdir(state))
        content = (files, (state / ADAPTER_FILES_NAME).read_bytes() == old_commit)
        if content in states:
            continue
        states.add(content)
        k2 = 1
        while True:
            target = _copy_store(state, tmp_path / f"k{k1}-{k2}")
            if not _save_crashing(adapters.models["old"], target, monkeypatch, k2, False):
                assert which(target) == "old"
                break
            assert which(target) in ("old", "new"), (k1, k2)
            k2 += 1
    assert len(states) == 2 * n + 1  # nothing, each file staged, the commit, each but one renamed


# ---------------------------------------------------------------------------------------------
# 3. a write refused part-way (RLIMIT_FSIZE)
# ---------------------------------------------------------------------------------------------
MANIFEST_CFG = dict(shard_size=4)  # rank-one shards of 4 samples: smaller than the manifest


def _refused_writes(workdir: Path) -> None:
    """The subprocess side: every task of ``plan.json`` under its file-size limit."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a refused write is then EFBIG, not a kill
    plan = json.loads((workdir / "plan.json").read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    results = {}
    for name, task in plan.items():
        new = None
        if task["kind"] == "save":
            new = ocdwrap.OCDModel.from_pretrained(make_mlp(), task["new"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (task["limit"], hard))
        try:
            if new is not None:
                new.save_pretrained(task["dir"], overwrite=True)
            else:
                ocdwrap.collect(
                    _wrap(**task["config"]),
                    _loader(),
                    CE,
                    task["dir"],
                    progress=False,
                    **task["io"],
                )
            results[name] = {"error": None}
        except Exception as e:
            results[name] = {
                "error": type(e).__name__,
                "oserror": isinstance(e, OSError),
                "errno": getattr(e, "errno", None),
                "message": str(e),
            }
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    (workdir / "results.json").write_text(json.dumps(results))


@dataclass
class Refused:
    results: dict
    dirs: dict[str, Path]
    before: dict[str, dict[str, torch.Tensor]]  # what the directories held before
    references: dict[str, ocdwrap.DeltaStore]


@pytest.fixture(scope="module")
def refused(store_dir: str, adapters: Adapters, tmp_path_factory) -> Refused:
    """One child process, three writes refused part-way:

    - ``shard``: continuing a collection stopped at max_samples=16 (one shard), the next shard
      is larger than the limit;
    - ``manifest``: a fresh collection whose manifest outgrows the limit after a few shards;
    - ``adapter``: saving the new adapter over the old one, its weights larger than the limit.
    """
    root = tmp_path_factory.mktemp("faults-fsize")
    dirs = {name: root / name for name in ("shard", "manifest", "adapter")}
    refs = {"shard": ocdwrap.DeltaStore(store_dir)}
    with _one_thread():
        ocdwrap.collect(
            _wrap(**FULL_STORE),
            _loader(),
            CE,
            dirs["shard"],
            max_samples=16,
            **SHARD,
            progress=False,
        )
        refs["manifest"] = ocdwrap.collect(
            _wrap(), _loader(), CE, root / "manifest-ref", **MANIFEST_CFG, progress=False
        )
    shard_bytes = os.path.getsize(dirs["shard"] / "shard-00000.safetensors")
    small = max(os.path.getsize(p) for p in refs["manifest"].shard_paths())
    manifest_bytes = os.path.getsize(root / "manifest-ref" / "manifest.json")
    assert manifest_bytes > small + 2000  # the manifest grows past the limit, shards do not
    _copy_store(adapters.dirs["old"], dirs["adapter"])
    weights = os.path.getsize(adapters.dirs["new"] / WEIGHTS_NAME)
    plan = {
        "shard": dict(kind="collect", config=FULL_STORE, io=SHARD, limit=shard_bytes // 2),
        "manifest": dict(
            kind="collect", config={}, io=MANIFEST_CFG, limit=(small + manifest_bytes) // 2
        ),
        "adapter": dict(kind="save", new=str(adapters.dirs["new"]), limit=weights // 2),
    }
    for name, task in plan.items():
        task["dir"] = str(dirs[name])
    (root / "plan.json").write_text(json.dumps(plan))
    before = {"shard": ocdwrap.DeltaStore(dirs["shard"]).load()}
    log = root / "worker.log"
    proc = _start_worker(log, "fsize", str(root))
    assert proc.wait(timeout=300) == 0, log.read_text()
    results = json.loads((root / "results.json").read_text())
    return Refused(results, dirs, before, refs)


def _assert_refused(result: dict) -> None:
    assert result["error"] is not None, "the write was not refused"
    assert result["oserror"] and result["errno"] == errno.EFBIG, result


def test_a_refused_shard_write_loses_nothing(refused: Refused) -> None:
    _assert_refused(refused.results["shard"])
    d = refused.dirs["shard"]
    kept = ocdwrap.DeltaStore(d)  # the collection saved before is there as it was
    assert len(kept) == 16 and kept.stopped == "max_samples"
    for k, v in refused.before["shard"].items():
        assert torch.equal(v, kept.load()[k]), k
    assert not [f for f in os.listdir(d) if f.startswith(".tmp")]
    with _one_thread():
        resumed = ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, **SHARD, progress=False)
    _assert_same_collection(resumed, refused.references["shard"])


def test_a_refused_manifest_write_loses_nothing(refused: Refused) -> None:
    _assert_refused(refused.results["manifest"])
    d = refused.dirs["manifest"]
    partial = ocdwrap.DeltaStore(d)  # the last manifest written whole
    assert not partial.complete and len(partial.manifest["shards"]) >= 1
    with _one_thread():
        resumed = ocdwrap.collect(_wrap(), _loader(), CE, d, **MANIFEST_CFG, progress=False)
    _assert_same_collection(resumed, refused.references["manifest"])


def test_a_refused_adapter_write_keeps_the_old_adapter(
    refused: Refused, adapters: Adapters
) -> None:
    _assert_refused(refused.results["adapter"])
    d = refused.dirs["adapter"]
    assert _which(d, adapters) == "old"
    adapters.models["new"].save_pretrained(d, overwrite=True)  # the next save goes through
    assert _which(d, adapters) == "new"


# ---------------------------------------------------------------------------------------------
# 4. two processes collecting into one directory
# ---------------------------------------------------------------------------------------------
def _race(workdir: Path, name: str) -> None:
    """The subprocess side: for each trial of ``plan.json``, wait at the barrier, then collect
    the trial's data (seed ``trial[name]``) into its directory and write what happened."""
    plan = json.loads((workdir / "plan.json").read_text())
    for i, trial in enumerate(plan):
        model = _wrap()
        x, y = _xy(RACE_N, trial[name])

        def slow(x=x, y=y):  # holds the directory ~0.3 s: the other process arrives meanwhile
            for batch in _loader(RACE_N, 8, x, y):
                time.sleep(0.05)
                yield batch

        (workdir / f"ready-{i}-{name}").touch()
        _await(workdir / f"go-{i}")
        if trial["after"] and name == "b":  # the second starts once the first has finished
            _await(workdir / f"result-{i}-a.json")
        try:
            store = ocdwrap.collect(
                model, slow(), CE, workdir / f"trial-{i}", **RACE_CFG, progress=False
            )
            out = {"outcome": "ok", "samples": len(store), "complete": store.complete}
        except CollectionBusyError:
            out = {"outcome": "busy"}
        except CollectionExistsError:
            out = {"outcome": "exists"}
        except Exception as e:  # reported, and fails the test
            out = {"outcome": f"{type(e).__name__}: {e}"}
        tmp = workdir / f".result-{i}-{name}"
        tmp.write_text(json.dumps(out))
        os.replace(tmp, workdir / f"result-{i}-{name}.json")


@dataclass
class Race:
    plan: list[dict]
    results: list[dict[str, dict]]
    workdir: Path
    references: dict[int, ocdwrap.DeltaStore]  # a single clean collection of each data seed


@pytest.fixture(scope="module")
def race(tmp_path_factory) -> Race:
    """Two processes, a and b, collecting into one directory at the same moment (a barrier
    file starts both), three times on the same data and three times on different data; then
    once each with b starting after a has finished."""
    root = tmp_path_factory.mktemp("faults-race")
    same, different = {"a": 0, "b": 0}, {"a": 0, "b": 1}
    plan = [{**t, "after": False} for t in (same, different) * 3]
    plan += [{**same, "after": True}, {**different, "after": True}]
    (root / "plan.json").write_text(json.dumps(plan))
    references = {}
    with _one_thread():
        for seed in (0, 1):
            x, y = _xy(RACE_N, seed)
            references[seed] = ocdwrap.collect(
                _wrap(),
                _loader(RACE_N, 8, x, y),
                CE,
                root / f"ref-{seed}",
                **RACE_CFG,
                progress=False,
            )
    procs = [_start_worker(root / f"{n}.log", "race", str(root), n) for n in ("a", "b")]
    results = []
    for i in range(len(plan)):
        for n in ("a", "b"):
            _wait_for(root / f"ready-{i}-{n}", procs, root / f"{n}.log")
        (root / f"go-{i}").touch()
        for n in ("a", "b"):
            _wait_for(root / f"result-{i}-{n}.json", procs, root / f"{n}.log")
        results.append({n: json.loads((root / f"result-{i}-{n}.json").read_text()) for n in "ab"})
    for n, proc in zip("ab", procs):
        assert proc.wait(timeout=60) == 0, (root / f"{n}.log").read_text()
    return Race(plan, results, root, references)


def _check_trials(race: Race, different: bool) -> list[str]:
    outcomes = []
    for i, (trial, result) in enumerate(zip(race.plan, race.results)):
        if (trial["a"] != trial["b"]) != different:
            continue
        got = {n: r["outcome"] for n, r in result.items()}
        winners = [n for n, o in got.items() if o == "ok"]
        losers = {o for n, o in got.items() if o != "ok"}
        if trial["after"]:  # b ran once a had finished
            assert got == {"a": "ok", "b": "exists" if different else "ok"}, got
        elif different:  # one collects; the other is locked out, or refused for its data
            assert len(winners) == 1 and losers <= {"busy", "exists"}, got
        else:  # one collects; the other is locked out, or finds the same collection done
            assert winners and losers <= {"busy"}, got
        for n in winners:
            assert result[n]["samples"] == RACE_N and result[n]["complete"], result
        # the directory holds a single clean collection of the winner's data, never a mix
        final = ocdwrap.DeltaStore(race.workdir / f"trial-{i}")
        _assert_same_collection(final, race.references[trial[winners[0]]])
        outcomes.append("/".join(sorted(got.values())))
    return outcomes


def test_two_processes_collecting_the_same_data_into_one_directory(race: Race) -> None:
    outcomes = _check_trials(race, different=False)
    assert "busy/ok" in outcomes[:3], outcomes  # they did overlap: one was locked out


def test_two_processes_collecting_different_data_into_one_directory(race: Race) -> None:
    outcomes = _check_trials(race, different=True)
    assert "busy/ok" in outcomes[:3], outcomes
    # never two successes on different data (one interleaved collection passed off as two)
    assert "ok/ok" not in outcomes, outcomes


# ---------------------------------------------------------------------------------------------
# 5. damaged files: a flipped byte, a changed digit, a truncated file
# ---------------------------------------------------------------------------------------------
def _change_digit(path: Path, key: str) -> tuple[str, str]:
    """Change the last digit of the first number stored under ``key`` (or first in its list)
    in a JSON file, keeping it valid JSON: what a flipped bit in a digit does."""
    text = path.read_text()
    found = re.search(rf'"{key}": \[?\s*(-?\d[\d.eE+-]*)', text)
    assert found, key
    value = found.group(1)
    at = found.start(1) + max(i for i, c in enumerate(value) if c.isdigit())
    changed = text[:at] + chr(ord(text[at]) ^ 1) + text[at + 1 :]  # 0<->1, 2<->3, ...
    json.loads(changed)  # still valid: only the checksum tells
    path.write_text(changed)
    return value, re.search(rf'"{key}": \[?\s*(-?\d[\d.eE+-]*)', changed).group(1)


@pytest.mark.parametrize(
    "key,delta", [("rho", "rank1"), ("u", "rank1"), ("delta", "full")], ids=["rho", "u", "delta"]
)
def test_a_flipped_byte_in_a_shard_stops_fit_and_collect_rebuilds_it(
    store_dir: str, tmp_path, key: str, delta: str
) -> None:
    d = _copy_store(store_dir, tmp_path / "s")
    reference = ocdwrap.DeltaStore(d).load()
    shard = ocdwrap.DeltaStore(d).manifest["shards"][1]
    flip_byte(d / shard["file"], key)  # inside the tensor's data, past the header
    with pytest.raises(CorruptFileError) as e:
        ocdwrap.fit(_wrap(**SMALL, delta=delta), d, ocdwrap.FitArgs(**FIT, steps=2), progress=False)
    message = str(e.value)
    assert shard["file"] in message and f"damaged: {key} do not match" in message
    assert f"samples {shard['start']}-{shard['stop'] - 1}" in message
    assert "ocdwrap.collect again" in message
    # a read of the shard's other keys checks exactly what it reads: it is not refused
    others = [k for k in ("index", "cond_in") if k != key]
    assert torch.equal(ocdwrap.DeltaStore(d).load(others)["cond_in"], reference["cond_in"])
    with _one_thread():
        rebuilt = ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, **SHARD, progress=False)
    _assert_same_collection(rebuilt, ocdwrap.DeltaStore(store_dir))


@pytest.fixture(scope="module")
def merged_dir(tmp_path_factory) -> str:
    """A collection of two parts, as two processes write it (``ocdwrap.collect_distributed``)."""
    from ocdwrap.io import part_name
    from ocdwrap.store_writer import merge_parts

    d = tmp_path_factory.mktemp("faults-merged")
    x, y = _xy(48)
    with _one_thread():
        for rank, (lo, hi) in enumerate(((0, 24), (24, 48))):
            part = d / part_name(rank, 2)
            loader = _loader(x=x[lo:hi], y=y[lo:hi])
            ocdwrap.collect(_wrap(), loader, CE, part, progress=False, shard_size=8)
    merge_parts(d, [(0, 24), (24, 48)], 2)
    return str(d)


@pytest.mark.parametrize(
    "field", ["count", "stop", "positions", "complete", "index_offset"], ids=lambda f: f
)
def test_a_changed_value_in_a_manifest_is_refused(
    store_dir: str, merged_dir: str, tmp_path, field: str
) -> None:
    src = merged_dir if field == "index_offset" else store_dir
    d = _copy_store(src, tmp_path / "s")
    manifest = d / "manifest.json"
    if field == "complete":  # a complete collection marked incomplete
        text = manifest.read_text()
        assert '"complete": true' in text
        manifest.write_text(text.replace('"complete": true', '"complete": false'))
    else:
        _change_digit(manifest, field)
    for call in (
        lambda: ocdwrap.DeltaStore(d),
        lambda: ocdwrap.fit(_wrap(**SMALL), d, ocdwrap.FitArgs(**FIT, steps=2), progress=False),
        lambda: ocdwrap.collect(_wrap(**FULL_STORE), _loader(), CE, d, **SHARD, progress=False),
    ):
        with pytest.raises(CorruptFileError, match=r"manifest\.json does not match the checksum"):
            call()


@pytest.mark.parametrize("what", ["weights", "config", "sampling"])
def test_a_flipped_byte_in_an_adapter_is_refused(adapters: Adapters, tmp_path, what: str) -> None:
    d = _copy_store(adapters.dirs["old"], tmp_path / "a")
    if what == "weights":
        name = WEIGHTS_NAME
        with safe_open(d / name, framework="pt") as f:
            key = max(f.keys(), key=lambda k: math.prod(f.get_slice(k).get_shape()))
        flip_byte(d / name, key)
    elif what == "config":
        name = CONFIG_NAME
        _change_digit(d / name, "num_train_timesteps")  # a config that would predict otherwise
    else:
        name = SAMPLING_NAME
        _change_digit(d / name, "sampling_steps")  # sampling defaults that would predict otherwise
    with pytest.raises(CorruptFileError, match=re.escape(name)) as e:
        ocdwrap.OCDModel.from_pretrained(make_mlp(), d)
    assert "save_pretrained" in str(e.value)
    adapters.models["old"].save_pretrained(d, overwrite=True)  # saving again repairs it
    assert _which(d, adapters) == "old"


@pytest.mark.parametrize("damage", ["truncated", "changed-digit"])
def test_a_damaged_adapter_file_list_is_refused(adapters: Adapters, tmp_path, damage: str) -> None:
    d = _copy_store(adapters.dirs["old"], tmp_path / "a")
    if damage == "truncated":
        _truncate(d / ADAPTER_FILES_NAME)
    else:
        _change_digit(d / ADAPTER_FILES_NAME, "bytes")
    with pytest.raises(CorruptFileError, match=ADAPTER_FILES_NAME):
        ocdwrap.OCDModel.from_pretrained(make_mlp(), d)
    adapters.models["new"].save_pretrained(d, overwrite=True)  # saving again repairs it
    assert _which(d, adapters) == "new"


@pytest.mark.parametrize("damage", ["tensors", "step", "losses"])
def test_a_flipped_byte_in_a_fit_checkpoint_is_refused(
    store_dir: str, tmp_path, damage: str
) -> None:
    ckpt = tmp_path / "ckpt"
    ocdwrap.fit(
        _wrap(**FIT_CFG),
        store_dir,
        ocdwrap.FitArgs(**FIT_KILL, steps=3),
        checkpoint_dir=ckpt,
        progress=False,
    )
    meta = json.loads((ckpt / "fit_checkpoint.json").read_text())
    if damage == "tensors":
        name = meta["tensors"]
        with safe_open(ckpt / name, framework="pt") as f:
            key = next(k for k in f.keys() if k.startswith("model."))
        flip_byte(ckpt / name, key)
    else:
        name = "fit_checkpoint.json"
        _change_digit(ckpt / name, damage)
    with pytest.raises(CorruptFileError, match=re.escape(name)) as e:
        ocdwrap.fit(
            _wrap(**FIT_CFG),
            store_dir,
            ocdwrap.FitArgs(**FIT_KILL, steps=3),
            checkpoint_dir=ckpt,
            progress=False,
        )
    assert "fit again" in str(e.value)


# the truncated, binary or malformed file of each kind (the tests of ocdwrap 0.1.0's files)
def test_damaged_shard_is_reported_and_rebuilt(store_dir: str, tmp_path) -> None:
    d = _copy_store(store_dir, tmp_path / "s")
    with _one_thread():
        reference = ocdwrap.DeltaStore(d).load()
    _truncate(d / "shard-00001.safetensors")
    for keys in (None, ["rho"]):  # both reading paths
        with pytest.raises(CorruptFileError, match="shard-00001.*collect"):
            ocdwrap.DeltaStore(d).load(keys)
    with pytest.raises(CorruptFileError):
        ocdwrap.fit(_wrap(**SMALL), d, ocdwrap.FitArgs(**FIT, steps=2), progress=False)
    with _one_thread():
        rebuilt = ocdwrap.collect(
            _wrap(**FULL_STORE), _loader(), CE, d, **SHARD, progress=False
        ).load()
    for k, v in reference.items():
        assert torch.equal(v, rebuilt[k]), k
    os.unlink(d / "shard-00002.safetensors")  # a missing shard too
    with pytest.raises(CorruptFileError, match="missing"):
        ocdwrap.DeltaStore(d).load()
    with _one_thread():
        rebuilt = ocdwrap.collect(
            _wrap(**FULL_STORE), _loader(), CE, d, **SHARD, progress=False
        ).load()
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
        ocdwrap.collect(_wrap(), _loader(), CE, d, progress=False, shard_size=16)


def test_damaged_checkpoint_is_a_clear_error(store_dir: str, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    cfg = dict(**SMALL)
    ocdwrap.fit(
        _wrap(**cfg),
        store_dir,
        ocdwrap.FitArgs(**FIT, checkpoint_every=5, steps=5),
        checkpoint_dir=ckpt,
        progress=False,
    )
    meta = json.loads((ckpt / "fit_checkpoint.json").read_text())
    tensors = ckpt / meta["tensors"]
    assert sorted(os.listdir(ckpt)) == sorted(["fit_checkpoint.json", meta["tensors"]])
    kept = tensors.read_bytes()
    _truncate(tensors)
    with pytest.raises(CorruptFileError, match=f"{meta['tensors']} does not match its recorded"):
        ocdwrap.fit(
            _wrap(**cfg),
            store_dir,
            ocdwrap.FitArgs(**FIT, checkpoint_every=5, steps=5),
            checkpoint_dir=ckpt,
            progress=False,
        )
    tensors.write_bytes(kept)
    _truncate(ckpt / "fit_checkpoint.json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        ocdwrap.fit(
            _wrap(**cfg),
            store_dir,
            ocdwrap.FitArgs(**FIT, steps=5),
            checkpoint_dir=ckpt,
            progress=False,
        )


def test_damaged_adapter_is_a_clear_error(adapters: Adapters, tmp_path) -> None:
    d = tmp_path / "adapter"
    adapters.models["old"].save_pretrained(d)
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


if __name__ == "__main__":
    _worker(sys.argv[1:])
