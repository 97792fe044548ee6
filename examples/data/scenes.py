"""A procedurally rendered scene for neural view synthesis, written and read in the Blender-NeRF layout.

The scene: coloured shapes given by signed distance functions (a sphere, a box, a torus and a low pedestal),
rendered by sphere tracing with Lambertian shading (one directional light plus ambient), anti-aliased by
supersampling, on a transparent background. Cameras sit on a hemisphere around the scene and look at its centre:
100 training views on a Fibonacci spiral, 25 test views and 5 validation views drawn at random on the same band.

The layout is the one of the NeRF "Blender" synthetic scenes, so :func:`load_blender` reads those too::

    <root>/transforms_train.json   {"camera_angle_x": fov_x, "frames": [{"file_path": "./train/r_0",
    <root>/transforms_val.json                                           "transform_matrix": 4x4 camera-to-world}]}
    <root>/transforms_test.json
    <root>/train/r_0.png ...       RGBA PNGs (alpha = coverage; composited on white when loaded)

Cameras follow the Blender/OpenGL convention: the camera looks along its -z axis, +y is up, +x right.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np

LIGHT = np.array([0.5, 0.35, 0.8]) / np.linalg.norm([0.5, 0.35, 0.8])
AMBIENT = 0.3
LOOK_AT = np.array([0.0, 0.0, 0.3])


# ---------------------------------------------------------------------------------------------- the scene
def _sd_box(p: np.ndarray, center: np.ndarray, half: np.ndarray) -> np.ndarray:
    q = np.abs(p - center) - half
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)


def _sd_torus(p: np.ndarray, center: np.ndarray, major: float, minor: float) -> np.ndarray:
    q = p - center
    ring = np.linalg.norm(q[..., :2], axis=-1) - major
    return np.sqrt(ring**2 + q[..., 2] ** 2) - minor


SHAPES: list[tuple[str, dict, tuple[float, float, float]]] = [
    ("sphere", {"center": (0.38, -0.05, 0.38), "radius": 0.3}, (0.85, 0.2, 0.15)),
    ("box", {"center": (-0.35, 0.3, 0.27), "half": (0.2, 0.2, 0.2)}, (0.2, 0.7, 0.25)),
    ("torus", {"center": (-0.15, -0.45, 0.15), "major": 0.28, "minor": 0.09}, (0.15, 0.3, 0.85)),
    ("box", {"center": (0.0, 0.0, 0.035), "half": (0.85, 0.85, 0.035)}, (0.85, 0.75, 0.45)),
]


def scene_sdf(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance to the scene at points ``p`` [..., 3] and the index of the nearest shape."""
    dists = []
    for kind, args, _ in SHAPES:
        if kind == "sphere":
            dists.append(np.linalg.norm(p - np.array(args["center"]), axis=-1) - args["radius"])
        elif kind == "box":
            dists.append(_sd_box(p, np.array(args["center"]), np.array(args["half"])))
        else:
            dists.append(_sd_torus(p, np.array(args["center"]), args["major"], args["minor"]))
    stacked = np.stack(dists, -1)
    return stacked.min(-1), stacked.argmin(-1)


def camera_rays(c2w: np.ndarray, width: int, height: int, focal: float) -> tuple[np.ndarray, np.ndarray]:
    """Origins and (unnormalised, z = -1 in camera space) directions of the rays through the pixel centres.

    Returns arrays of shape ``[height, width, 3]`` (the NeRF convention, shared with the model's renderer).
    """
    i, j = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5, indexing="xy")
    dirs = np.stack([(i - width / 2) / focal, -(j - height / 2) / focal, -np.ones_like(i)], -1)
    rays_d = dirs @ c2w[:3, :3].T
    rays_o = np.broadcast_to(c2w[:3, 3], rays_d.shape)
    return rays_o, rays_d


def trace(rays_o: np.ndarray, rays_d: np.ndarray, steps: int = 96, far: float = 8.0) -> np.ndarray:
    """Sphere-trace rays [N, 3]; returns RGBA [N, 4] in [0, 1] (alpha 0 where nothing is hit)."""
    d = rays_d / np.linalg.norm(rays_d, axis=-1, keepdims=True)
    t = np.zeros(len(d))
    alive = np.ones(len(d), bool)
    hit = np.zeros(len(d), bool)
    for _ in range(steps):
        idx = np.nonzero(alive)[0]
        if idx.size == 0:
            break
        dist, _ = scene_sdf(rays_o[idx] + t[idx, None] * d[idx])
        t[idx] += dist
        done = dist < 1e-4
        hit[idx[done]] = True
        alive[idx[done | (t[idx] > far)]] = False
    rgba = np.zeros((len(d), 4))
    idx = np.nonzero(hit)[0]
    if idx.size:
        p = rays_o[idx] + t[idx, None] * d[idx]
        _, shape = scene_sdf(p)
        eps = 1e-4
        normal = np.stack([scene_sdf(p + e)[0] - scene_sdf(p - e)[0] for e in np.eye(3) * eps], -1)
        normal /= np.linalg.norm(normal, axis=-1, keepdims=True) + 1e-12
        shade = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT, 0.0, None)
        colours = np.array([c for _, _, c in SHAPES])[shape]
        rgba[idx, :3] = np.clip(colours * shade[:, None], 0.0, 1.0)
        rgba[idx, 3] = 1.0
    return rgba


def look_at(position: np.ndarray, target: np.ndarray = LOOK_AT) -> np.ndarray:
    """Camera-to-world matrix (Blender/OpenGL: looks along -z, +y up) of a camera at ``position``."""
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w


def hemisphere_positions(n: int, radius: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` camera positions at elevations 15-65 degrees: a Fibonacci spiral, or uniform draws with ``rng``."""
    lo, hi = math.sin(math.radians(15)), math.sin(math.radians(65))
    if rng is None:
        k = np.arange(n) + 0.5
        z = lo + (hi - lo) * k / n
        phi = k * math.pi * (3 - math.sqrt(5))
    else:
        z = rng.uniform(lo, hi, n)
        phi = rng.uniform(0, 2 * math.pi, n)
    r = np.sqrt(1 - z**2)
    return radius * np.stack([r * np.cos(phi), r * np.sin(phi), z], -1) + LOOK_AT


def render_view(c2w: np.ndarray, size: int, focal: float, supersample: int = 3) -> np.ndarray:
    """RGBA image [size, size, 4] in [0, 1], supersampled ``supersample`` x ``supersample`` per pixel."""
    s = supersample
    rays_o, rays_d = camera_rays(c2w, size * s, size * s, focal * s)
    rgba = trace(rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)).reshape(size, s, size, s, 4)
    # average premultiplied colour, then un-premultiply so that compositing on any background is right
    alpha = rgba[..., 3].mean((1, 3))
    rgb = (rgba[..., :3] * rgba[..., 3:]).mean((1, 3)) / np.maximum(alpha, 1e-8)[..., None]
    return np.concatenate([rgb, alpha[..., None]], -1)


def write_scene(
    root: str,
    size: int = 32,
    n_train: int = 100,
    n_test: int = 25,
    n_val: int = 5,
    radius: float = 4.0,
    camera_angle_x: float = 0.6,
    supersample: int = 3,
    seed: int = 0,
) -> str:
    """Render the scene into ``root`` in the Blender-NeRF layout (skipped if already there); returns ``root``."""
    marker = os.path.join(root, "transforms_test.json")
    if os.path.exists(marker):
        with open(marker) as f:
            meta = json.load(f)
        if meta.get("procedural", {}).get("size") == size and len(meta["frames"]) == n_test:
            return root
    from PIL import Image

    focal = 0.5 * size / math.tan(0.5 * camera_angle_x)
    rng = np.random.default_rng(seed)
    splits = {
        "train": hemisphere_positions(n_train, radius),
        "val": hemisphere_positions(n_val, radius, rng),
        "test": hemisphere_positions(n_test, radius, rng),
    }
    for split, positions in splits.items():
        os.makedirs(os.path.join(root, split), exist_ok=True)
        frames = []
        for k, pos in enumerate(positions):
            c2w = look_at(pos)
            rgba = render_view(c2w, size, focal, supersample)
            Image.fromarray(np.round(rgba * 255).astype(np.uint8), "RGBA").save(os.path.join(root, split, f"r_{k}.png"))
            frames.append({"file_path": f"./{split}/r_{k}", "rotation": 0.0, "transform_matrix": c2w.tolist()})
        meta = {"camera_angle_x": camera_angle_x, "frames": frames, "procedural": {"size": size, "seed": seed}}
        with open(os.path.join(root, f"transforms_{split}.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return root


@dataclass
class Views:
    """One split of a Blender-layout scene: images [N, H, W, 3] float32 in [0, 1] (composited on the background),
    camera-to-world poses [N, 4, 4] float32, and the focal length in pixels."""

    images: np.ndarray
    poses: np.ndarray
    focal: float

    @property
    def height(self) -> int:
        return int(self.images.shape[1])

    @property
    def width(self) -> int:
        return int(self.images.shape[2])

    def rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins and directions, each [N, H, W, 3] float32."""
        out = [camera_rays(p, self.width, self.height, self.focal) for p in self.poses]
        return (
            np.stack([o for o, _ in out]).astype(np.float32),
            np.stack([d for _, d in out]).astype(np.float32),
        )


def load_blender(root: str, split: str, white_background: bool = True, size: int | None = None) -> Views:
    """Read one split (``"train"``, ``"val"``, ``"test"``) of a Blender-layout scene (real or procedural).

    Args:
        root: the scene folder (holds ``transforms_<split>.json``).
        split: which split.
        white_background: composite RGBA images on white (as NeRF does for Blender scenes), else on black.
        size: resize to ``size`` x ``size`` (for the 800 x 800 real scenes); the focal length follows.
    """
    from PIL import Image

    with open(os.path.join(root, f"transforms_{split}.json")) as f:
        meta = json.load(f)
    images, poses = [], []
    for frame in meta["frames"]:
        path = os.path.join(root, frame["file_path"])
        if not os.path.splitext(path)[1]:
            path += ".png"
        img = Image.open(path).convert("RGBA")
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BOX)
        images.append(np.asarray(img, dtype=np.float32) / 255.0)
        poses.append(np.array(frame["transform_matrix"], dtype=np.float32))
    rgba = np.stack(images)
    bg = 1.0 if white_background else 0.0
    rgb = rgba[..., :3] * rgba[..., 3:] + bg * (1 - rgba[..., 3:])
    width = rgba.shape[2]
    focal = 0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"]))
    return Views(rgb.astype(np.float32), np.stack(poses), focal)
