"""Procedural 3-D scenes rendered by volume rendering: offline stand-ins for the NeRF Blender scenes.

The paper's novel-view-synthesis experiment (its Table 3) uses the Synthetic-Blender scenes Lego,
Hotdog and Drums, which are not available offline. This module builds three distinct objects from
shaded, coloured primitives (spheres, boxes, capsules, cylinders, tori) as a signed distance
function (SDF), turns the SDF into a density, and renders views of it by volume rendering (fixed
depth samples, alpha compositing over a black background, as in the authors' tiny_nerf data):

* ``lego``: a yellow bulldozer-like toy (body and cab with stripes, tracks, blade, exhaust pipe);
* ``hotdog``: a sausage in a bun with mustard dots, on a plate with a torus rim;
* ``drums``: a drum kit (bass drum with rims, two toms, a snare, two cymbals on stands).

Colour is view-independent (Lambert shading with a fixed light baked into the albedo), so the
TinyNeRF of ``benchmarks.nerf``, which takes no view direction, can represent it. Views are taken
on the upper hemisphere (camera distance 4, looking at the origin, world up +z), 100 x 100 pixels
with focal 138.9 (the authors' tiny_nerf data; a smaller ``size`` scales the focal with it).

    data = load_scene("lego")          # 100 training + 25 test views, cached after the first call
    data.train_images.shape            # (100, 100, 100, 3), float32 in [0, 1]

Views are cached in the user's cache directory (``$XDG_CACHE_HOME/ocdwrap/scenes``, by default
``~/.cache/ocdwrap/scenes``) as compressed ``.npz`` files (no pickle), with the generation time
stored in the file; the same arguments always render the same images.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ocdwrap.errors import OCDError

VERSION = 1  # bump when the scenes or the renderer change: old cache files are then ignored
FOCAL_100 = 138.9  # the authors' tiny_nerf focal length at 100 x 100 pixels
RADIUS = 4.0  # camera distance from the origin
NEAR, FAR = 2.0, 6.0  # the depth range rendered (the authors' tiny_nerf)
BOUND = 1.6  # every scene lies inside this sphere
SOFTNESS = 0.015  # width of the SDF -> density transition
DENSITY = 60.0  # density inside an object
TRUTH_SAMPLES = 256  # depth samples per ray of the ground-truth renders
LIGHT = (0.45, -0.35, 0.82)  # direction towards the light (normalised in use)
AMBIENT = 0.35


class SceneShapeError(OCDError, ValueError):
    """Images or poses of a shape the scene renderer did not make."""


# --- primitives: signed distance of points (N, 3) to a shape -----------------------------------
_AXES = {"x": (1, 2, 0), "y": (2, 0, 1), "z": (0, 1, 2)}  # local coordinates with the axis last


def _local(p: torch.Tensor, center: tuple[float, ...], axis: str = "z") -> torch.Tensor:
    return (p - torch.tensor(center, dtype=p.dtype))[:, list(_AXES[axis])]


def sphere(center: tuple, r: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda p: (p - torch.tensor(center, dtype=p.dtype)).norm(dim=1) - r


def box(center: tuple, half: tuple, rounding: float = 0.0) -> Callable:
    def f(p: torch.Tensor) -> torch.Tensor:
        q = (p - torch.tensor(center, dtype=p.dtype)).abs() - torch.tensor(half, dtype=p.dtype)
        q = q + rounding
        outside = q.clamp_min(0).norm(dim=1)
        return outside + q.amax(dim=1).clamp_max(0) - rounding

    return f


def cylinder(center: tuple, r: float, half_height: float, axis: str = "z") -> Callable:
    def f(p: torch.Tensor) -> torch.Tensor:
        q = _local(p, center, axis)
        d = torch.stack([q[:, :2].norm(dim=1) - r, q[:, 2].abs() - half_height], dim=1)
        return d.amax(dim=1).clamp_max(0) + d.clamp_min(0).norm(dim=1)

    return f


def torus(center: tuple, big_r: float, r: float, axis: str = "z") -> Callable:
    def f(p: torch.Tensor) -> torch.Tensor:
        q = _local(p, center, axis)
        return torch.stack([q[:, :2].norm(dim=1) - big_r, q[:, 2]], dim=1).norm(dim=1) - r

    return f


def capsule(a: tuple, b: tuple, r: float) -> Callable:
    def f(p: torch.Tensor) -> torch.Tensor:
        ta, tb = torch.tensor(a, dtype=p.dtype), torch.tensor(b, dtype=p.dtype)
        ab = tb - ta
        h = ((p - ta) @ ab / ab.dot(ab)).clamp(0, 1)
        return (p - ta - h[:, None] * ab).norm(dim=1) - r

    return f


@dataclass
class Part:
    """One primitive of a scene: its SDF, colour, and optional stripes (frequency, direction)."""

    sdf: Callable[[torch.Tensor], torch.Tensor]
    colour: tuple[float, float, float]
    stripes: tuple[float, tuple[float, float, float]] | None = None

    def albedo(self, p: torch.Tensor) -> torch.Tensor:
        c = torch.tensor(self.colour, dtype=p.dtype).expand(len(p), 3)
        if self.stripes is None:
            return c
        freq, direction = self.stripes
        band = torch.sin(freq * (p @ torch.tensor(direction, dtype=p.dtype)))
        return c * (0.78 + 0.22 * torch.sign(band)).unsqueeze(1)


YELLOW, DARK, GREY = (0.95, 0.75, 0.1), (0.12, 0.12, 0.14), (0.55, 0.55, 0.6)


def _lego() -> list[Part]:
    return [
        Part(box((0.0, 0.0, 0.05), (0.55, 0.32, 0.22), 0.03), YELLOW, (18.0, (1.0, 0.0, 0.3))),
        Part(box((-0.2, 0.0, 0.48), (0.24, 0.28, 0.21), 0.02), YELLOW),
        Part(box((-0.2, 0.0, 0.53), (0.25, 0.29, 0.08)), (0.2, 0.35, 0.55)),
        Part(box((0.0, 0.42, -0.3), (0.68, 0.1, 0.16), 0.08), DARK, (22.0, (1.0, 0.0, 0.0))),
        Part(box((0.0, -0.42, -0.3), (0.68, 0.1, 0.16), 0.08), DARK, (22.0, (1.0, 0.0, 0.0))),
        Part(box((0.85, 0.0, -0.22), (0.05, 0.55, 0.2), 0.01), GREY),
        Part(box((0.66, 0.28, -0.05), (0.18, 0.04, 0.04)), GREY),
        Part(box((0.66, -0.28, -0.05), (0.18, 0.04, 0.04)), GREY),
        Part(cylinder((0.3, 0.15, 0.45), 0.05, 0.2), DARK),
        Part(sphere((0.25, -0.18, 0.3), 0.08), (0.9, 0.15, 0.1)),
    ]


def _hotdog() -> list[Part]:
    bun, mustard = (0.85, 0.6, 0.3), (1.0, 0.85, 0.05)
    parts = [
        Part(cylinder((0.0, 0.0, -0.38), 1.05, 0.04), (0.93, 0.93, 0.9)),
        Part(torus((0.0, 0.0, -0.33), 1.0, 0.06), (0.3, 0.45, 0.85)),
        Part(capsule((-0.6, 0.2, -0.12), (0.6, 0.2, -0.12), 0.2), bun),
        Part(capsule((-0.6, -0.2, -0.12), (0.6, -0.2, -0.12), 0.2), bun),
        Part(
            capsule((-0.85, 0.0, 0.0), (0.85, 0.0, 0.0), 0.15), (0.7, 0.2, 0.1), (25.0, (1, 0, 0))
        ),
    ]
    for i, x in enumerate(np.linspace(-0.55, 0.55, 6)):
        parts.append(Part(sphere((float(x), 0.06 * (-1) ** i, 0.14), 0.055), mustard))
    return parts


def _drums() -> list[Part]:
    red, white, gold = (0.75, 0.1, 0.15), (0.92, 0.92, 0.92), (0.85, 0.65, 0.2)
    parts = [
        Part(cylinder((0.0, 0.25, -0.2), 0.45, 0.2, "y"), red, (14.0, (1.0, 0.0, 0.0))),
        Part(torus((0.0, 0.05, -0.2), 0.45, 0.035, "y"), white),
        Part(torus((0.0, 0.45, -0.2), 0.45, 0.035, "y"), white),
        Part(cylinder((-0.45, -0.25, 0.25), 0.22, 0.12), (0.15, 0.3, 0.8)),
        Part(cylinder((0.45, -0.25, 0.22), 0.2, 0.11), (0.15, 0.65, 0.3)),
        Part(cylinder((0.0, -0.6, -0.15), 0.22, 0.08), white),
        Part(torus((0.0, -0.6, -0.07), 0.22, 0.025), GREY),
    ]
    for x, z in ((-0.85, 0.62), (0.85, 0.55)):
        parts.append(Part(cylinder((x, 0.3, z), 0.32, 0.025), gold, (40.0, (1.0, 1.0, 0.0))))
        parts.append(Part(cylinder((x, 0.3, (z - 0.65) / 2), 0.025, (z + 0.65) / 2), GREY))
    return parts


SCENES: dict[str, Callable[[], list[Part]]] = {"lego": _lego, "hotdog": _hotdog, "drums": _drums}


class Scene:
    """The union of a scene's parts: signed distance and shaded colour at points (N, 3)."""

    def __init__(self, name: str) -> None:
        if name not in SCENES:
            raise ValueError(f"unknown scene {name!r}; choose one of {sorted(SCENES)}")
        self.name, self.parts = name, SCENES[name]()

    def sdf(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance (N,), index of the nearest part (N,))."""
        d = torch.stack([part.sdf(p) for part in self.parts], dim=1)
        return d.min(dim=1)

    def colour(self, p: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        """Lambert-shaded colour (N, 3) of points ``p`` lying on parts ``part``."""
        eps = 1e-3
        taps = torch.tensor([[1, -1, -1], [-1, -1, 1], [-1, 1, -1], [1, 1, 1]], dtype=p.dtype)
        normal = sum(k * self.sdf(p + eps * k)[0].unsqueeze(1) for k in taps)  # tetrahedron taps
        normal = F.normalize(normal, dim=1)
        light = F.normalize(torch.tensor(LIGHT, dtype=p.dtype), dim=0)
        shade = AMBIENT + (1 - AMBIENT) * (normal @ light).clamp_min(0)
        out = torch.zeros(len(p), 3, dtype=p.dtype)
        for i, prt in enumerate(self.parts):
            sel = part == i
            if sel.any():
                out[sel] = prt.albedo(p[sel])
        return (out * shade.unsqueeze(1)).clamp(0, 1)

    def density_colour(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density (N,) and colour (N, 3); only points inside the bounding sphere are shaded."""
        sigma = torch.zeros(len(p), dtype=p.dtype)
        rgb = torch.zeros(len(p), 3, dtype=p.dtype)
        inside = (p.norm(dim=1) < BOUND).nonzero().squeeze(1)
        if len(inside):
            d, part = self.sdf(p[inside])
            sigma[inside] = DENSITY * torch.sigmoid(-d / SOFTNESS)
            near = (d < 8 * SOFTNESS).nonzero().squeeze(1)
            if len(near):
                rgb[inside[near]] = self.colour(p[inside[near]], part[near])
        return sigma, rgb


# --- cameras and rays -------------------------------------------------------------------------
def look_at(eye: torch.Tensor) -> torch.Tensor:
    """The camera-to-world matrix (4, 4) of a camera at ``eye`` looking at the origin, z up
    (camera convention of NeRF: the camera looks along its -z axis, y up)."""
    z = F.normalize(eye, dim=0)
    x = F.normalize(torch.linalg.cross(torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype), z), dim=0)
    y = torch.linalg.cross(z, x)
    pose = torch.eye(4, dtype=eye.dtype)
    pose[:3, 0], pose[:3, 1], pose[:3, 2], pose[:3, 3] = x, y, z, eye
    return pose


def hemisphere_poses(n: int, seed: int, radius: float = RADIUS) -> torch.Tensor:
    """``n`` camera poses (n, 4, 4), uniform on the upper hemisphere (elevation 5 to 80 degrees)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.empty(n).uniform_(math.sin(math.radians(5)), math.sin(math.radians(80)), generator=g)
    phi = torch.empty(n).uniform_(0, 2 * math.pi, generator=g)
    r = (1 - z**2).sqrt()
    eyes = radius * torch.stack([r * phi.cos(), r * phi.sin(), z], dim=1)
    return torch.stack([look_at(e) for e in eyes])


def camera_rays(
    poses: torch.Tensor, height: int, width: int, focal: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and directions (B, H*W, 3) of every pixel of every pose (B, 4, 4).

    Directions are not normalised (their camera-frame z is -1, as in the authors' tiny_nerf), so
    depth ``t`` along a ray is the distance along the camera's viewing axis.
    """
    check_poses(poses)
    j, i = torch.meshgrid(
        torch.arange(height, dtype=poses.dtype, device=poses.device),
        torch.arange(width, dtype=poses.dtype, device=poses.device),
        indexing="ij",
    )
    cam = torch.stack(
        [(i - width / 2 + 0.5) / focal, -(j - height / 2 + 0.5) / focal, -torch.ones_like(i)], -1
    ).reshape(-1, 3)  # (H*W, 3)
    dirs = torch.einsum("pc,brc->bpr", cam, poses[:, :3, :3])
    origins = poses[:, None, :3, 3].expand_as(dirs)
    return origins, dirs


def composite(
    sigma: torch.Tensor, rgb: torch.Tensor, step: torch.Tensor, background: float
) -> torch.Tensor:
    """Alpha compositing along the last sample axis: sigma (..., S), rgb (..., S, 3), step
    (..., S) the length of each sample's interval -> colour (..., 3) over ``background``."""
    alpha = 1 - torch.exp(-sigma * step)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], -1), -1)
    weights = alpha * trans[..., :-1]
    colour = (weights.unsqueeze(-1) * rgb).sum(-2)
    return colour + (1 - weights.sum(-1, keepdim=True)) * background


def render(
    scene: Scene,
    poses: torch.Tensor,
    size: int,
    focal: float,
    *,
    samples: int = TRUTH_SAMPLES,
    background: float = 0.0,
    chunk: int = 4096,
) -> torch.Tensor:
    """Images (B, size, size, 3) of ``scene`` seen from ``poses``, ``samples`` fixed depth
    samples per ray (bin midpoints in [NEAR, FAR]); deterministic."""
    origins, dirs = camera_rays(poses, size, size, focal)
    o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    t = NEAR + (FAR - NEAR) * (torch.arange(samples, dtype=o.dtype) + 0.5) / samples
    out = []
    for s in range(0, len(o), chunk):
        oc, dc = o[s : s + chunk], d[s : s + chunk]
        pts = oc[:, None] + dc[:, None] * t[None, :, None]  # (R, S, 3)
        sigma, rgb = scene.density_colour(pts.reshape(-1, 3))
        step = (FAR - NEAR) / samples * dc.norm(dim=1, keepdim=True).expand(-1, samples)
        out.append(composite(sigma.view(-1, samples), rgb.view(-1, samples, 3), step, background))
    return torch.cat(out).reshape(len(poses), size, size, 3)


# --- checks -----------------------------------------------------------------------------------
def check_poses(poses: torch.Tensor) -> None:
    """Raise :class:`SceneShapeError` unless ``poses`` is a float tensor (B, 4, 4).

    Nothing to check while ``torch.fx`` traces a model (ocdwrap's split forward): the check
    runs on the real poses of every call."""
    if isinstance(poses, torch.fx.Proxy):
        return
    if not isinstance(poses, torch.Tensor) or poses.dim() != 3 or poses.shape[1:] != (4, 4):
        shape = tuple(poses.shape) if isinstance(poses, torch.Tensor) else type(poses).__name__
        raise SceneShapeError(
            f"camera poses must be a tensor (B, 4, 4) of camera-to-world matrices; got {shape}. "
            "Stack the poses of a batch (poses[None] for one view)."
        )


def check_images(images: torch.Tensor, size: int, what: str = "images") -> None:
    """Raise :class:`SceneShapeError` unless ``images`` is (B, size, size, 3), as rendered."""
    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else None
    if shape is None or len(shape) != 4 or shape[1:] != (size, size, 3):
        raise SceneShapeError(
            f"{what} must be (B, {size}, {size}, 3) (views of {size} x {size} pixels, RGB last, as "
            f"benchmarks.scenes renders them); got {shape or type(images).__name__}. Render the "
            f"scene at this size (load_scene(name, size={size})), or resize the images to it with "
            "channels last."
        )


# --- the cached data set ----------------------------------------------------------------------
@dataclass
class SceneData:
    """The views of one scene: images (N, H, W, 3) in [0, 1] and poses (N, 4, 4)."""

    name: str
    train_images: torch.Tensor
    train_poses: torch.Tensor
    test_images: torch.Tensor
    test_poses: torch.Tensor
    size: int
    focal: float
    background: float
    seconds: float  # the time it took to render (when generated; stored in the cache file)
    path: str | None = None
    cached: bool = False  # True when read from the cache

    def __post_init__(self) -> None:
        for images, poses, what in (
            (self.train_images, self.train_poses, "training"),
            (self.test_images, self.test_poses, "test"),
        ):
            check_images(images, self.size, f"{self.name} {what} images")
            check_poses(poses)
            if len(images) != len(poses):
                raise SceneShapeError(
                    f"{self.name}: {len(images)} {what} images but {len(poses)} poses; pass one "
                    "pose per image."
                )


def cache_dir() -> str:
    """``$XDG_CACHE_HOME/ocdwrap/scenes``, by default ``~/.cache/ocdwrap/scenes``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ocdwrap", "scenes")


def load_scene(
    name: str,
    *,
    size: int = 100,
    n_train: int = 100,
    n_test: int = 25,
    seed: int = 0,
    directory: str | None = None,
) -> SceneData:
    """The views of scene ``name`` (``lego``, ``hotdog``, ``drums``): ``n_train`` training and
    ``n_test`` test views of ``size`` x ``size`` pixels (focal 138.9 * size / 100), poses drawn
    with ``seed``; rendered once, then read from the cache (``directory``, default
    :func:`cache_dir`)."""
    Scene(name)  # validates the name
    meta = {
        "scene": name, "size": size, "n_train": n_train, "n_test": n_test, "seed": seed,
        "focal": FOCAL_100 * size / 100, "samples": TRUTH_SAMPLES, "version": VERSION,
        "background": 0.0,
    }  # fmt: skip
    directory = directory or cache_dir()
    path = os.path.join(directory, f"{name}-{size}px-{n_train}+{n_test}-seed{seed}-v{VERSION}.npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
            stored = json.loads(str(f["meta"]))
            if stored.get("params") == meta:
                return _from_arrays(name, f, stored, path)
    return _generate(name, meta, path)


def _from_arrays(name: str, f: np.lib.npyio.NpzFile, stored: dict, path: str) -> SceneData:
    p = stored["params"]
    return SceneData(
        name, *(torch.from_numpy(f[k]) for k in ("train_images", "train_poses", "test_images", "test_poses")),
        size=p["size"], focal=p["focal"], background=p["background"], seconds=stored["seconds"],
        path=path, cached=True,
    )  # fmt: skip


def _generate(name: str, meta: dict, path: str) -> SceneData:
    t0 = time.perf_counter()
    scene = Scene(name)
    poses = hemisphere_poses(meta["n_train"] + meta["n_test"], meta["seed"])
    with torch.no_grad():
        images = render(scene, poses, meta["size"], meta["focal"], background=meta["background"])
    seconds = time.perf_counter() - t0
    n = meta["n_train"]
    arrays = {
        "train_images": images[:n].numpy(), "train_poses": poses[:n].numpy(),
        "test_images": images[n:].numpy(), "test_poses": poses[n:].numpy(),
    }  # fmt: skip
    stored = {"params": meta, "seconds": seconds, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, meta=np.array(json.dumps(stored)), **arrays)
    os.replace(tmp, path)  # a stopped run never leaves half a file under the real name
    return SceneData(
        name, *(torch.from_numpy(arrays[k]) for k in arrays), size=meta["size"],
        focal=meta["focal"], background=meta["background"], seconds=seconds, path=path,
    )  # fmt: skip


# --- the figure of docs/results.md --------------------------------------------------------------
def plot_scenes(path: str, *, views: int = 4, size: int = 100, seed: int = 0) -> str:
    """The first ``views`` training views of each scene (the same pixels :func:`load_scene`
    caches, rendered here without caching the rest), one row per scene, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SCENES), views, figsize=(1.9 * views, 1.9 * len(SCENES)))
    poses = hemisphere_poses(views, seed)  # the first training poses of every data set
    for r, name in enumerate(SCENES):
        with torch.no_grad():
            images = render(Scene(name), poses, size, FOCAL_100 * size / 100)
        for c in range(views):
            ax = axes[r, c]
            ax.imshow(images[c].clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(f"{name}\n(stand-in)", fontsize=9)
    fig.suptitle(
        f"benchmarks.scenes: training views 0-{views - 1}, {size} x {size} px, focal "
        f"{FOCAL_100 * size / 100:g}, seed {seed}",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scenes",
        description="Draw the figure of the procedural scenes; with --cache, render and cache "
        "every view of each scene at --size.",
    )
    p.add_argument("--figure", default="docs/img/nerf-scenes.png", help="where the PNG goes")
    p.add_argument("--views", type=int, default=4, help="views per scene in the figure")
    p.add_argument("--size", type=int, default=100, help="pixels per side")
    p.add_argument("--cache", action="store_true", help="also render and cache the data sets")
    args = p.parse_args(argv)
    print(f"wrote {plot_scenes(args.figure, views=args.views, size=args.size)}")
    for name in SCENES if args.cache else ():
        data = load_scene(name, size=args.size)
        how = "read from the cache" if data.cached else "rendered"
        print(f"{name}: {how} ({data.path}); generation took {data.seconds:.1f} s")


if __name__ == "__main__":
    main()
