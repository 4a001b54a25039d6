"""`synthetic-objects`: scenes built to test LeOCLR's premise that two random crops of one image
often show different semantic content.

Each image is a cluttered background, ONE main object whose shape is the label, and
`distractors` smaller objects of other classes. A crop that misses the main object but catches a
distractor shows a different class: exactly the case where MoCo-v2's crop-vs-crop positive pair
is semantically wrong and LeOCLR's crop-vs-original pair is not. Colours, positions, sizes and
the clutter are drawn independently of the label, so only shape carries class information.

Everything is vectorised numpy: each object slot is rasterised for a whole block of images at
once on a small pixel patch around it, from signed distance functions (anti-aliased edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from leoclr_core.data.base import InMemorySource, check_resize, check_split
from leoclr_core.spec.models import SyntheticSpec

CLASS_NAMES = ("disc", "square", "triangle", "ring", "plus", "star", "crescent", "bars", "L", "T")
BLOCK = 256  # images per RNG stream: generation is chunkable and independent of how it is chunked
MAX_ROTATION = np.deg2rad(20.0)  # small, so plus/square/L/T keep their orientation-defined identity
_TAG = 0x5EED_0B1E  # separates these streams from any other user of (seed, ...)
_SPLIT_KEYS = {"train": 0, "test": 1}
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ---- shapes: signed distance in object units (the shape fits in [-1, 1]^2), negative inside ----
def _disc(u, v, r, cx=0.0, cy=0.0):
    return np.hypot(u - cx, v - cy) - r


def _box(u, v, hx, hy, cx=0.0, cy=0.0):
    qx, qy = np.abs(u - cx) - hx, np.abs(v - cy) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _triangle(u, v):
    # Equilateral, pointing up, shifted so its bounding box is centred; exact inside, close outside.
    r, v = 1.1, v - 0.275
    d = np.full(u.shape, -np.inf, u.dtype)
    for k in range(3):
        a = np.pi / 2 + 2 * np.pi * k / 3  # outward normals: down, upper-left, upper-right
        d = np.maximum(d, u * np.cos(a) + v * np.sin(a) - r / 2)
    return d


def _star(u, v, r=1.0, rf=0.45):
    # Inigo Quilez's exact 5-pointed star; v is flipped so a point faces up.
    k1x, k1y = 0.809016994375, -0.587785252292
    px, py = np.abs(u), -v - 0.1
    for kx, ky in ((k1x, k1y), (-k1x, k1y)):
        t = 2 * np.maximum(kx * px + ky * py, 0)
        px, py = px - t * kx, py - t * ky
    px, py = np.abs(px), py - r
    bax, bay = rf * -k1y, rf * k1x - 1
    h = np.clip((px * bax + py * bay) / (bax * bax + bay * bay), 0, r)
    return np.hypot(px - bax * h, py - bay * h) * np.sign(py * bax - px * bay)


SHAPES = (
    lambda u, v: _disc(u, v, 0.85),
    lambda u, v: _box(u, v, 0.72, 0.72),
    _triangle,
    lambda u, v: np.abs(np.hypot(u, v) - 0.66) - 0.25,
    lambda u, v: np.minimum(_box(u, v, 0.9, 0.24), _box(u, v, 0.24, 0.9)),
    _star,
    lambda u, v: np.maximum(_disc(u, v, 0.88), -_disc(u, v, 0.72, 0.42, -0.3)),
    lambda u, v: np.minimum(_box(u, v, 0.88, 0.2, cy=-0.5), _box(u, v, 0.88, 0.2, cy=0.5)),
    lambda u, v: np.minimum(_box(u, v, 0.22, 0.88, cx=-0.55), _box(u, v, 0.77, 0.22, cy=0.66)),
    lambda u, v: np.minimum(_box(u, v, 0.88, 0.22, cy=-0.66), _box(u, v, 0.22, 0.88)),
)
assert len(SHAPES) == len(CLASS_NAMES)


def _clutter_sdf(kind, dx, dy, p):
    """Class-independent strokes in pixel units: 0 line segment, 1 arc, 2 dot."""
    if kind == 0:  # capsule along angle p[0], half-length p[1], half-width p[2]
        c, s = np.cos(p[0]), np.sin(p[0])
        t = np.clip(dx * c + dy * s, -p[1], p[1])
        return np.hypot(dx - t * c, dy - t * s) - p[2]
    if kind == 1:  # circular arc of radius p[1], half-width p[2], opening half-angle p[3] about p[0]
        ring = np.abs(np.hypot(dx, dy) - p[1]) - p[2]
        off = np.abs((np.arctan2(dy, dx) - p[0] + np.pi) % (2 * np.pi) - np.pi)
        return np.where(off <= p[3], ring, np.inf)
    return np.hypot(dx, dy) - p[1]  # dot of radius p[1]


def _paint(canvas, cx, cy, patch, colour, sdf_of):
    """Alpha-blend one object per image. `sdf_of(dx, dy)` -> pixel SDF, (B, patch, patch).

    Only a `patch` x `patch` window around each object is evaluated; it is shifted (not clipped)
    to stay inside the image, which still covers the object's visible part because patch >= extent.
    Only pixels the object touches are written back, which keeps thin clutter strokes cheap.
    """
    b, s = canvas.shape[:2]
    patch = min(patch, s)
    ar = np.arange(patch)
    x0 = np.clip(np.floor(cx - patch / 2).astype(np.int64), 0, s - patch)
    y0 = np.clip(np.floor(cy - patch / 2).astype(np.int64), 0, s - patch)
    xs, ys = (x0[:, None] + ar).astype(np.float32) + 0.5, (y0[:, None] + ar).astype(np.float32) + 0.5
    dx = np.broadcast_to((xs - cx[:, None].astype(np.float32))[:, None, :], (b, patch, patch))
    dy = np.broadcast_to((ys - cy[:, None].astype(np.float32))[:, :, None], (b, patch, patch))
    alpha = np.clip(0.5 - sdf_of(dx, dy), 0.0, 1.0)
    hit = alpha > 0
    img, yi, xi = np.nonzero(hit)
    flat = canvas.reshape(-1, 3)
    idx = (img * s + y0[img] + yi) * s + x0[img] + xi
    a = alpha[hit][:, None]
    flat[idx] += a * (colour[img] - flat[idx])


def _grouped(keys, fn):
    """Evaluate `fn(key, dx, dy, sel)` per distinct key and stitch the results (vectorised per group)."""

    def sdf_of(dx, dy):
        out = np.empty(dx.shape, np.float32)
        for k in np.unique(keys):
            sel = keys == k
            out[sel] = fn(int(k), dx[sel], dy[sel], sel)
        return out

    return sdf_of


def _colours(rng, lum, chroma):
    """Random colours with exactly luminance `lum`: hue/saturation carry no class information."""
    c = lum[:, None] + chroma * (rng.random((lum.size, 3), dtype=np.float32) - 0.5)
    c += (lum - c @ _LUMA)[:, None]
    return np.clip(c, 0.0, 1.0)


def _contrasting(rng, bg_lum, lo, hi):
    """Luminances `lo..hi` away from the background, on whichever side has room."""
    d = rng.uniform(lo, hi, bg_lum.size).astype(np.float32)
    up = bg_lum + d <= 0.98
    down = bg_lum - d >= 0.02
    sign = np.where(up & down, np.where(rng.random(bg_lum.size) < 0.5, 1, -1), np.where(up, 1, -1))
    return np.clip(bg_lum + sign * d, 0.02, 0.98).astype(np.float32)


def _upsample_matrix(cells: int, size: int) -> np.ndarray:
    """(size, cells) bilinear weights: a coarse random grid becomes smooth low-frequency noise."""
    pos = np.clip((np.arange(size) + 0.5) / size * cells - 0.5, 0, cells - 1)
    lo = np.minimum(np.floor(pos).astype(int), cells - 2)
    w = np.zeros((size, cells), np.float32)
    w[np.arange(size), lo] = 1 - (pos - lo)
    w[np.arange(size), lo + 1] = pos - lo
    return w


@dataclass(frozen=True)
class SceneMeta:
    """Where things are, for tests and for the crop-semantics experiment (pixels, x0 y0 x1 y1)."""

    object_boxes: np.ndarray  # (N, 4) float32, the main object's box clipped to the image
    distractor_boxes: np.ndarray  # (N, D, 4) float32
    distractor_classes: np.ndarray  # (N, D) int64, each != the image's label


def _render_block(rng: np.random.Generator, labels: np.ndarray, spec: SyntheticSpec):
    b, s, k = labels.size, spec.source_size, spec.num_classes
    px = s / 64.0  # stroke widths scale with the image
    # Background: dark or light base, two octaves of smooth colour noise.
    bg_lum = np.where(rng.random(b) < 0.5, rng.uniform(0.08, 0.36, b), rng.uniform(0.64, 0.92, b))
    bg_lum = bg_lum.astype(np.float32)
    canvas = np.broadcast_to(_colours(rng, bg_lum, 0.5 * spec.chroma)[:, None, None, :], (b, s, s, 3)).copy()
    coarse, fine = _upsample_matrix(3, 7), _upsample_matrix(7, s)
    grid = 0.22 * (rng.random((b, 3, 3, 3), dtype=np.float32) - 0.5)
    grid = coarse @ grid @ coarse.T + 0.1 * (rng.random((b, 3, 7, 7), dtype=np.float32) - 0.5)
    canvas += (fine @ grid @ fine.T).transpose(0, 2, 3, 1)
    # Clutter: thin lines, arcs and dots, drawn under the objects.
    for _ in range(spec.clutter):
        kind = rng.integers(0, 3, b)
        params = np.stack(
            [
                rng.uniform(-np.pi, np.pi, b),
                np.where(kind == 0, rng.uniform(0.05, 0.15, b) * s, rng.uniform(0.04, 0.1, b) * s),
                rng.uniform(0.45, 0.9, b) * px,
                rng.uniform(0.5, 1.6, b),
            ]
        ).astype(np.float32)
        params[1] = np.where(kind == 2, rng.uniform(0.8, 2.2, b) * px, params[1])
        colour = _colours(rng, _contrasting(rng, bg_lum, 0.12, 0.45), 0.6 * spec.chroma)
        cx, cy = rng.uniform(0, s, b), rng.uniform(0, s, b)
        sdf = _grouped(kind, lambda t, dx, dy, sel: _clutter_sdf(t, dx, dy, params[:, sel, None, None]))
        _paint(canvas, cx, cy, int(np.ceil(0.3 * s)) + 4, colour, sdf)
    # Objects: distractors first (placed away from the main object), the main object on top.
    size = rng.uniform(*spec.object_size, b)
    centre = np.stack([rng.uniform(0.4 * size, s - 0.4 * size) for _ in range(2)], axis=1)
    placed = [(centre, size / 2)]
    d_cls = (labels[:, None] + rng.integers(1, k, (b, spec.distractors))) % k
    d_box = np.zeros((b, spec.distractors, 4), np.float32)
    objects = []
    for j in range(spec.distractors):
        dsize = rng.uniform(*spec.distractor_size, b)
        cand = rng.random((b, 24, 2)) * (s - 0.8 * dsize)[:, None, None] + 0.4 * dsize[:, None, None]
        gap = np.min([np.hypot(*(cand - c[:, None]).transpose(2, 0, 1)) - r[:, None] for c, r in placed], axis=0)
        best = cand[np.arange(b), np.argmax(gap - dsize[:, None] / 2, axis=1)]
        placed.append((best, dsize / 2))
        objects.append((d_cls[:, j], best, dsize))
        d_box[:, j] = np.concatenate([best - dsize[:, None] / 2, best + dsize[:, None] / 2], axis=1)
    objects.append((labels, centre, size))
    for cls, c, sz in objects:
        angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION, b)
        colour = _colours(rng, _contrasting(rng, bg_lum, 0.3, 0.55), 0.7 * spec.chroma)
        cos, sin, half = (x.astype(np.float32)[:, None, None] for x in (np.cos(angle), np.sin(angle), sz / 2))

        def shape_sdf(t, dx, dy, sel, cos=cos, sin=sin, half=half):
            h = half[sel]
            u, v = (dx * cos[sel] + dy * sin[sel]) / h, (dy * cos[sel] - dx * sin[sel]) / h
            return SHAPES[t](u, v) * h

        _paint(canvas, c[:, 0], c[:, 1], int(np.ceil(sz.max() * 1.3)) + 2, colour, _grouped(cls, shape_sdf))
    box = np.concatenate([centre - size[:, None] / 2, centre + size[:, None] / 2], axis=1)
    images = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    return images, np.clip(box, 0, s).astype(np.float32), np.clip(d_box, 0, s), d_cls.astype(np.int64)


class SyntheticObjects(InMemorySource):
    """Deterministic by (seed, split): same arguments give byte-identical images; the test split
    draws from different RNG streams, so its images are new scenes, not copies of training ones.

    Generated eagerly: `images` (N, H, W, 3) uint8, `labels` (N,) int64, `meta` (SceneMeta).
    """

    name = "synthetic-objects"

    def __init__(
        self,
        num_images: int,
        seed: int = 0,
        split: str = "train",
        spec: SyntheticSpec | None = None,
        *,
        labelled: bool = True,
        resize_to: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_images, (int, np.integer)) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        self.split = check_split(split)
        self.spec = spec = spec or SyntheticSpec()
        self.seed, self.labelled = int(seed), bool(labelled)
        self.resize_to = check_resize(resize_to)
        self.fixed_size = self.resize_to or spec.source_size
        self.class_names = list(CLASS_NAMES[: spec.num_classes])
        self.classes = self.class_names if self.labelled else None
        n, split_key = int(num_images), _SPLIT_KEYS[split]
        labels = np.arange(n, dtype=np.int64) % spec.num_classes
        self._rng(split_key, 0, 0).shuffle(labels)
        parts = [
            _render_block(self._rng(split_key, 1, blk), labels[blk * BLOCK : (blk + 1) * BLOCK], spec)
            for blk in range((n + BLOCK - 1) // BLOCK)
        ]
        self.images = np.concatenate([p[0] for p in parts])
        self.labels = labels
        self.meta = SceneMeta(*(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3)))

    def _rng(self, *key: int) -> np.random.Generator:
        ss = np.random.SeedSequence([_TAG, self.seed % 2**64], spawn_key=key)
        return np.random.Generator(np.random.PCG64(ss))

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous(), int(self.labels[index])

