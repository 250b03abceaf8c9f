"""Two CPU processes (gloo, through accelerate): sharded collection equals a single-process one,
and data-parallel fitting reaches the single-process fit's weights."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import flip_byte, make_mlp
from safetensors.torch import load_file, save_file
from torch import nn

import ocdwrap
from benchmarks.datasets import tensor_loader
from ocdwrap.distributed import (
    CollectionExistsError,
    collect_distributed,
    merge_parts,
    partition,
)
from ocdwrap.hypernet import OCDHyperNetwork
from ocdwrap.io import CHECKPOINT_JSON

N, BATCH, WORLD = 44, 8, 2
# spawn, not fork: a forked child of a process whose OpenMP pool is running can deadlock in
# its first matrix product (seen under pytest after earlier tests used torch)
START = "spawn"
FIT = dict(steps=6, batch_size=8, seed=0)
SHARD = 5  # samples per shard of every collection here


def config() -> ocdwrap.OCDConfig:
    return ocdwrap.OCDConfig(
        delta="full",  # stores every key: delta, u, v, energy, conditioning
        unet_channels=(8, 8),
        cond_dim=16,
        mlp_hidden=16,
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 10, generator=g), torch.randint(0, 3, (N,), generator=g)


def loader() -> torch.utils.data.DataLoader:
    return tensor_loader(*data(), batch_size=BATCH)


def ce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(pred, y, reduction="none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == world
    model = ocdwrap.wrap(make_mlp(), layer="fc2", config=config())
    # a quick look first (max_samples), then the whole data into the same directory: several
    # processes cannot continue the first 16 samples' parts, and say so on every process
    partial = os.path.join(out, "partial")
    store = collect_distributed(
        model,
        loader(),
        ce,
        partial,
        accelerator=accelerator,
        progress=False,
        max_samples=16,
        shard_size=SHARD,
    )
    outcome = {"partial": [len(store), store.stopped, store.positions]}
    try:
        collect_distributed(
            model, loader(), ce, partial, accelerator=accelerator, progress=False, shard_size=SHARD
        )
    except (CollectionExistsError, ocdwrap.distributed.DistributedError) as e:
        outcome["whole_after_partial"] = [type(e).__name__, str(e)]
    store = collect_distributed(
        model,
        loader(),
        ce,
        os.path.join(out, "deltas"),
        accelerator=accelerator,
        progress=False,
        shard_size=SHARD,
    )
    assert len(store) == N
    # the whole collection, asked for its first 16 samples: returned whole, at once
    again = collect_distributed(
        model,
        loader(),
        ce,
        os.path.join(out, "deltas"),
        accelerator=accelerator,
        progress=False,
        max_samples=16,
        shard_size=SHARD,
    )
    outcome["partial_after_whole"] = [len(again), again.stopped]
    with open(os.path.join(out, f"outcome-{rank}.json"), "w") as f:
        json.dump(outcome, f)
    # the one fit(), through the plain torch.distributed group that accelerate initialised;
    # checkpoints come from the main process only
    ckpt = os.path.join(out, f"ckpt-{rank}")
    report = ocdwrap.fit(
        model,
        store,
        ocdwrap.FitArgs(**FIT, checkpoint_every=3),
        progress=False,
        checkpoint_dir=ckpt,
    )
    assert os.path.exists(os.path.join(ckpt, CHECKPOINT_JSON)) == (rank == 0)
    save_file(
        {k: v.contiguous() for k, v in model.hypernet.state_dict().items()},
        os.path.join(out, f"hyper-{rank}.safetensors"),
    )
    with open(os.path.join(out, f"losses-{rank}.json"), "w") as f:
        json.dump(report.losses, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.start_processes(
        _worker, args=(WORLD, _free_port(), out), nprocs=WORLD, join=True, start_method=START
    )
    return out


def test_partition_cuts_at_batch_boundaries():
    assert partition(44, 8, 2) == [(0, 24), (24, 44)]
    assert partition(10, 4, 4) == [(0, 4), (4, 8), (8, 10), (10, 10)]
    assert partition(3, 8, 2) == [(0, 3), (3, 3)]


def test_sharded_collection_equals_single_process(two_process_run, tmp_path):
    merged = ocdwrap.DeltaStore(os.path.join(two_process_run, "deltas"))
    assert merged.complete and merged.manifest["world_size"] == WORLD
    files = [s["file"] for s in merged.manifest["shards"]]
    assert {f.split("/")[0] for f in files} == {"part-00000-of-00002", "part-00001-of-00002"}
    single = ocdwrap.collect(
        ocdwrap.wrap(make_mlp(), layer="fc2", config=config()),
        loader(),
        ce,
        tmp_path / "single",
        progress=False,
        shard_size=SHARD,
    )
    assert len(merged) == len(single) == N
    assert merged.keys == single.keys and merged.dims == single.dims
    assert merged.manifest["identity"] == single.manifest["identity"]
    a, b = merged.load(), single.load()
    assert torch.equal(a["index"], torch.arange(N)) and torch.equal(b["index"], torch.arange(N))
    for k in single.keys:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    for k in ("count", "rho_mean"):
        assert merged.manifest["summary"][k] == pytest.approx(single.manifest["summary"][k])
    # a merged collection is an ordinary one: collect() sees it complete, fit() reads it
    model = ocdwrap.wrap(make_mlp(), layer="fc2", config=config())
    again = ocdwrap.collect(
        model, loader(), ce, os.path.join(two_process_run, "deltas"), shard_size=SHARD
    )
    assert again.manifest == merged.manifest


def test_ddp_fit_equals_single_process_fit(two_process_run):
    h0 = load_file(os.path.join(two_process_run, "hyper-0.safetensors"))
    h1 = load_file(os.path.join(two_process_run, "hyper-1.safetensors"))
    for k in h0:  # every process holds the same weights
        torch.testing.assert_close(h0[k], h1[k], rtol=0, atol=0, msg=k)
    model = ocdwrap.wrap(make_mlp(), layer="fc2", config=config())
    report = ocdwrap.fit(
        model,
        os.path.join(two_process_run, "deltas"),
        ocdwrap.FitArgs(**FIT),
        progress=False,
    )
    with open(os.path.join(two_process_run, "losses-0.json")) as f:
        losses = json.load(f)
    assert losses == pytest.approx(report.losses, rel=1e-5)
    ref = model.hypernet.state_dict()
    for k in ref:
        if not k.startswith(("net.", "ema.")):  # statistics of the collection
            torch.testing.assert_close(h0[k], ref[k], msg=k)
    torch.manual_seed(FIT["seed"])  # fit()'s initial weights
    init = OCDHyperNetwork(
        model.config, kind="linear", weight_shape=model.weight_shape, dims=model.hypernet.dims
    ).state_dict()
    for prefix in ("net.", "ema."):
        keys = [k for k in ref if k.startswith(prefix)]
        moved = sum(float((ref[k] - init[k]).norm() ** 2) for k in keys) ** 0.5
        apart = sum(float((ref[k] - h0[k]).norm() ** 2) for k in keys) ** 0.5
        # the gradients agree to float rounding; Adam's first steps amplify that rounding for
        # parameters with near-zero gradients, so compare against how far the weights moved
        assert moved > 0 and apart < 0.05 * moved, (prefix, moved, apart)


def test_single_process_fallbacks_equal_the_core_functions(tmp_path):
    model = ocdwrap.wrap(make_mlp(), layer="fc2", config=config())
    store = collect_distributed(
        model, loader(), ce, tmp_path / "d", progress=False, shard_size=SHARD
    )
    single = ocdwrap.collect(
        ocdwrap.wrap(make_mlp(), layer="fc2", config=config()),
        loader(),
        ce,
        tmp_path / "s",
        progress=False,
        shard_size=SHARD,
    )
    a, b = store.load(), single.load()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_partial_collection_is_never_passed_off_as_the_whole(two_process_run):
    for rank in range(WORLD):
        with open(os.path.join(two_process_run, f"outcome-{rank}.json")) as f:
            outcome = json.load(f)
        assert outcome["partial"] == [16, "max_samples", 16]
        # the main process names the directory, what it holds and the ways on; the other is
        # told that a step failed on another process (no process hangs or goes on)
        kind, message = outcome["whole_after_partial"]
        if rank == 0:
            assert kind == "CollectionExistsError"
            assert "first 16 samples" in message and "max_samples=16" in message
            assert "overwrite=True" in message and "ocdwrap.collect" in message
        else:
            assert kind == "DistributedError"
        assert outcome["partial_after_whole"] == [N, "end_of_data"]
    # the refused call left the partial collection as it was
    store = ocdwrap.DeltaStore(os.path.join(two_process_run, "partial"))
    assert len(store) == 16 and store.stopped == "max_samples"


def test_one_process_continues_a_partial_multi_process_collection(two_process_run, tmp_path):
    import shutil

    d = shutil.copytree(os.path.join(two_process_run, "partial"), tmp_path / "partial")
    model = ocdwrap.wrap(make_mlp(), layer="fc2", config=config())
    store = ocdwrap.collect(model, loader(), ce, d, progress=False, shard_size=SHARD)
    assert len(store) == N and store.stopped == "end_of_data" and store.verified
    whole = ocdwrap.DeltaStore(os.path.join(two_process_run, "deltas")).load()
    got = store.load()
    assert torch.equal(got["index"], torch.arange(N))
    for k, v in whole.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_a_flipped_byte_in_a_merged_collection_stops_fit(two_process_run, tmp_path):
    import shutil

    d = tmp_path / "merged"
    shutil.copytree(os.path.join(two_process_run, "deltas"), d)
    store = ocdwrap.DeltaStore(d)
    assert store.verified
    shard = store.manifest["shards"][3]
    path = d / shard["file"]
    flip_byte(path, "rho")  # a value fit reads, inside the tensor data, past the header
    model = ocdwrap.wrap(make_mlp(), layer="fc2", config=config())
    with pytest.raises(ocdwrap.errors.CorruptFileError, match=shard["file"].split("/")[1]) as e:
        ocdwrap.fit(model, d, ocdwrap.FitArgs(), progress=False)
    assert f"samples {shard['start']}-{shard['stop'] - 1}" in str(e.value)
    assert "collect again" in str(e.value).lower() or "ocdwrap.collect again" in str(e.value)


def test_merge_refuses_changed_data_and_foreign_collections(two_process_run, tmp_path):
    root = os.path.join(two_process_run, "deltas")
    with pytest.raises(ocdwrap.distributed.DistributedError, match="data changed"):
        merge_parts(root, [(0, 24), (24, 50)], WORLD)
    from ocdwrap.distributed import _clear_root

    single = tmp_path / "single"
    ocdwrap.collect(
        ocdwrap.wrap(make_mlp(), layer="fc2", config=config()),
        loader(),
        ce,
        single,
        progress=False,
        shard_size=SHARD,
    )

    def fingerprint():
        raise AssertionError("not needed for a collection of another process count")

    with pytest.raises(CollectionExistsError, match="overwrite=True"):
        _clear_root(str(single), WORLD, False, N, fingerprint)
    _clear_root(str(single), WORLD, True, N, fingerprint)
    assert not os.path.exists(single / "manifest.json")
