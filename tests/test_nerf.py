"""The procedural scenes (deterministic, cached, shaped as stated), the TinyNeRF whose forward
takes poses and returns images with the view in dim 0 of its first layer, and a ``--smoke`` run
of ``python -m benchmarks.nerf`` with every row."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ocdwrap
from benchmarks import nerf, scenes
from benchmarks.controls import rank_energy, truncate
from benchmarks.nerf import ImageTask, TinyNeRF, image_mse, rows_for
from benchmarks.scenes import SceneData, SceneShapeError, load_scene
from ocdwrap.deltas import FullDelta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[SceneData, str]:
    directory = str(tmp_path_factory.mktemp("scenes"))
    return load_scene("hotdog", size=16, n_train=3, n_test=2, directory=directory), directory


def test_scene_is_cached_and_read_back_without_rendering(small, monkeypatch) -> None:
    data, directory = small
    assert not data.cached and data.seconds > 0
    assert os.path.dirname(data.path) == directory and data.path.endswith(".npz")

    def no_render(*args, **kwargs):
        raise AssertionError("the second load rendered the scene again")

    monkeypatch.setattr(scenes, "render", no_render)
    again = load_scene("hotdog", size=16, n_train=3, n_test=2, directory=directory)
    assert again.cached and again.seconds == pytest.approx(data.seconds)  # the stored time
    for key in ("train_images", "train_poses", "test_images", "test_poses"):
        assert torch.equal(getattr(again, key), getattr(data, key)), key


def test_rendering_is_deterministic_and_views_differ(small) -> None:
    data, _ = small
    poses = scenes.hemisphere_poses(5, seed=0)  # the data set's poses: 3 train, then 2 test
    assert torch.equal(poses[:3], data.train_poses) and torch.equal(poses[3:], data.test_poses)
    again = scenes.render(scenes.Scene("hotdog"), poses, 16, data.focal)  # as load_scene does
    assert torch.equal(again[:3], data.train_images) and torch.equal(again[3:], data.test_images)
    alone = scenes.render(scenes.Scene("hotdog"), data.train_poses[:1], 16, data.focal)
    assert torch.allclose(alone[0], data.train_images[0], atol=1e-5)  # rounding of other chunks
    assert not torch.allclose(data.train_images[0], data.train_images[1])
    other = scenes.render(scenes.Scene("drums"), data.train_poses[:1], 16, data.focal)
    assert (other[0] - data.train_images[0]).abs().mean() > 0.01  # the scenes are distinct


def test_views_have_the_stated_shapes_and_cameras(small) -> None:
    data, _ = small
    assert data.train_images.shape == (3, 16, 16, 3) and data.test_images.shape == (2, 16, 16, 3)
    assert data.train_poses.shape == (3, 4, 4) and data.focal == pytest.approx(138.9 * 16 / 100)
    assert 0 <= float(data.train_images.min()) and float(data.train_images.max()) <= 1
    assert float(data.train_images.mean()) > 0.02  # the object is in view, not only background
    eyes = torch.cat([data.train_poses, data.test_poses])[:, :3, 3]
    assert torch.allclose(eyes.norm(dim=1), torch.full((5,), scenes.RADIUS))
    assert bool((eyes[:, 2] > 0).all())  # upper hemisphere
    # each camera looks at the origin: its -z axis points from the eye to the origin
    forward = -torch.cat([data.train_poses, data.test_poses])[:, :3, 2]
    assert torch.allclose(forward, -eyes / scenes.RADIUS, atol=1e-6)


def test_images_of_another_shape_raise_a_clear_error(small) -> None:
    data, _ = small
    with pytest.raises(SceneShapeError, match=r"must be \(B, 16, 16, 3\).*got \(3, 3, 16, 16\)"):
        SceneData(
            "hotdog", data.train_images.permute(0, 3, 1, 2), data.train_poses, data.test_images,
            data.test_poses, size=16, focal=data.focal, background=0.0, seconds=0.0,
        )  # fmt: skip
    with pytest.raises(SceneShapeError, match="3 training images but 2 poses"):
        SceneData(
            "hotdog", data.train_images, data.train_poses[:2], data.test_images,
            data.test_poses, size=16, focal=data.focal, background=0.0, seconds=0.0,
        )  # fmt: skip
    with pytest.raises(SceneShapeError, match="resize the images"):
        image_mse(torch.zeros(2, 16, 16, 3), torch.zeros(2, 32, 32, 3))
    with pytest.raises(SceneShapeError, match=r"poses must be a tensor \(B, 4, 4\)"):
        TinyNeRF(16, 22.2)(torch.eye(4))
    with pytest.raises(ValueError, match="unknown scene 'chair'"):
        load_scene("chair")


def test_tinynerf_renders_images_with_the_view_in_dim_0() -> None:
    torch.manual_seed(0)
    model = TinyNeRF(12, 16.7, samples=6).eval()
    assert [tuple(m.weight.shape) for m in (model.fc1, model.fc2, model.out)] == [
        (128, 63),
        (128, 128),
        (4, 128),
    ]
    seen = []
    model.fc1.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    poses = scenes.hemisphere_poses(3, seed=1)
    with torch.no_grad():
        images = model(poses)
        alone = model(poses[1:2])
    assert images.shape == (3, 12, 12, 3)
    assert seen[0] == (3, 12 * 12 * 6, 63)  # one fc1 call: (views, rays x samples, 63)
    assert torch.allclose(images[1], alone[0], atol=1e-6)  # views do not mix


def test_a_per_view_delta_changes_only_its_view() -> None:
    """ocdwrap's dynamic fc1 gives each view of a batch its own weight."""
    torch.manual_seed(0)
    base = TinyNeRF(8, 11.1, samples=4).eval()
    model = ocdwrap.wrap(base, layer="fc1", sampling=ocdwrap.SamplingConfig(task="regression"))
    poses = scenes.hemisphere_poses(2, seed=2)
    delta = torch.zeros(2, 128, 63)
    delta[1] = 0.5 * torch.randn(128, 63)
    with torch.no_grad():
        with model.disable_adapter():
            plain = model(poses)
        with model.use_deltas(FullDelta(delta)):
            moved = model(poses)
    assert torch.equal(moved[0], plain[0])
    assert (moved[1] - plain[1]).abs().max() > 1e-3
    model.unload()


def test_truncated_deltas_and_their_energy() -> None:
    torch.manual_seed(0)
    d = torch.randn(2, 6, 5)
    assert torch.allclose(truncate(d, 5), d, atol=1e-5)
    assert torch.linalg.matrix_rank(truncate(d, 2)).tolist() == [2, 2]
    energy = rank_energy(d, ranks=(1, 5))
    assert 0 < energy["1"] < 1 and energy["5"] == pytest.approx(1.0)
    assert ImageTask().metrics({"loss": 0.01}) == {"mse": 0.01, "psnr": pytest.approx(20.0)}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``--smoke`` run: (its process, the output directory)."""
    tmp_path = tmp_path_factory.mktemp("smoke")
    out = tmp_path / "out.json"
    argv = ["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work")]
    argv += ["--cache-dir", str(tmp_path / "scenes"), "--plots", str(tmp_path / "figs")]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.nerf", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    return proc, tmp_path


def test_smoke_run_reports_every_row(smoke) -> None:
    proc, tmp_path = smoke
    out = tmp_path / "out.json"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| base TinyNeRF |" in proc.stdout and "| row |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m benchmarks.nerf --smoke")
    part = data["datasets"]["lego"]
    assert list(part["rows"]) == [r.key for r in rows_for("lego", 4)]
    assert "full_unet" in part["rows"]  # the full-matrix UNet's own row beside the low-rank OCD
    rows = part["per_seed"]["0"]
    assert set(rows) == set(part["rows"])
    for key, metrics in rows.items():
        assert all(math.isfinite(v) for v in metrics.values()), key
        assert metrics["psnr"] == pytest.approx(-10 * math.log10(metrics["mse"])), key
    assert rows["overfit"]["mse"] < rows["base"]["mse"]  # the upper bound is below the base
    assert rows["overfit"]["mse"] <= rows["overfit_rank"]["mse"] * 1.0001
    assert part["rows"]["base"]["paper"] == {"mse": ".076"}
    info = part["info"]["0"]
    assert info["ocd"]["collect_summary"]["count"] == 10  # every training view collected
    hr = info["headroom"]  # ocdwrap.headroom on the test views, probe fitted on the training views
    assert hr["task"] == "regression" and hr["n"] == 2 and hr["layer"] == "fc1"
    assert {"base", "overfit", "probe", "probe_mixture"} <= set(hr["rows"])
    assert hr["probe"]["residual_std_summary"]["outputs"] == 32 * 32 * 3  # one image per view
    assert set(info["ocd"]["true_delta_rank_energy"]) == {"1", "2", "4", "8", "16"}
    assert info["compute_matched"]["iterations"] > 0
    assert 0 < info["peak_rss_mb"] < 8 * 1024  # recorded; the bound is 8 GiB
    assert info["ocd"]["config"]["delta"] == "lowrank" and info["ocd"]["config"]["delta_rank"] == 4
    assert info["ocd"]["config"]["output_layout"] == "channels_last"
    assert info["ocd"]["full_unet"]["config"]["unet_channels"] == [8, 16]
    assert (tmp_path / "figs" / "nerf-lego-views.png").stat().st_size > 5_000
    assert (tmp_path / "figs" / "results-nerf-lego.png").stat().st_size > 10_000
    # the shared rows are ocdwrap.compare's (PSNR through its metrics=), the full-matrix UNet
    # row its own comparison's ocd row
    comparison = info["ocd"]["comparison"]
    for key in ("base", "overfit", "ocd", "ocd_k", "regression", "nearest", "probe", "global"):
        assert rows[key]["mse"] == comparison["rows"][key]["loss"], key
        assert rows[key]["psnr"] == comparison["rows"][key]["metrics"]["psnr"], key
    assert rows["compute_matched"]["mse"] == comparison["rows"]["compute_matched"]["loss"]
    assert comparison["rows"]["own_label"]["skipped"]  # regression: no own label
    full = info["ocd"]["full_unet"]["comparison"]["rows"]["ocd"]
    assert rows["full_unet"]["mse"] == full["loss"]


def test_merge_makes_one_table_of_two_runs(smoke, tmp_path) -> None:
    proc, smoke_dir = smoke
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((smoke_dir / "out.json").read_text())
    other = json.loads((smoke_dir / "out.json").read_text())
    part = other["datasets"]["lego"]
    part["per_seed"] = {"1": part["per_seed"]["0"]}  # the same run standing in for seed 1
    part["info"] = {"1": part["info"]["0"]}
    (tmp_path / "s1.json").write_text(json.dumps(other))
    paths = [str(smoke_dir / "out.json"), str(tmp_path / "s1.json")]
    merged = nerf.merge(paths, "python -m benchmarks.nerf --merge ...")
    table = merged["datasets"]["lego"]
    assert sorted(table["per_seed"]) == ["0", "1"] and merged["settings"]["seeds"] == [0, 1]
    base = table["rows"]["base"]["metrics"]["mse"]
    assert base["n"] == 2 and base["sd"] == 0.0
    assert base["mean"] == pytest.approx(first["datasets"]["lego"]["per_seed"]["0"]["base"]["mse"])
    assert merged["command"].startswith(first["command"] + " && ")
    with pytest.raises(SystemExit, match="lego seed 0 is in two runs"):
        nerf.merge([paths[0], paths[0]], "merge")
    other["settings"]["samples"] = 24
    (tmp_path / "s24.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"other settings.*\['samples'\]"):
        nerf.merge([paths[0], str(tmp_path / "s24.json")], "merge")


def test_tinynerf_takes_the_split_forward(tmp_path) -> None:
    """TinyNeRF traces with torch.fx, so an OCD forward at fc1 takes the split forward (the
    positional encoding once, the part from fc1 on twice); the split render equals the whole."""
    from ocdwrap import split as split_mod

    torch.manual_seed(0)
    base = TinyNeRF(8, 11.1, samples=4).eval()
    poses = scenes.hemisphere_poses(3, seed=0)
    split = split_mod.SplitModel(base, "fc1")
    with torch.no_grad():
        torch.testing.assert_close(split.suffix(split.prefix((poses,), {})), base(poses))
    cfg = ocdwrap.OCDConfig(
        delta="lowrank", delta_rank=2, output_layout="channels_last", overfit_steps=1
    )
    m = ocdwrap.wrap(base, layer="fc1", config=cfg)
    store = ocdwrap.collect(m, [(poses, torch.rand(3, 8, 8, 3))], image_mse, str(tmp_path / "c"))
    ocdwrap.fit(m, store, ocdwrap.FitArgs(steps=1), progress=False)
    with torch.no_grad():
        m(poses)
    assert split_mod._SPLITS.get(m) is not None and split_mod._SPLITS[m].verified
