"""Synthetic datasets in MVTec-AD layout: products with defects of known kind, strength and exact mask.

Three products cover the cases a detector meets: ``grid`` (a periodic texture, stored as 8-bit grey like
MVTec's grid), ``marble`` (an irregular texture) and ``nut`` (an object on a plain background). Every normal
image is drawn afresh (phase, noise, pose, colour, lighting), so a detector has to learn the product.

A defect edits the drawn scene (its surface, or the object's outline for ``missing``); the mask is exactly
the set of pixels whose value the edit changed by more than ``MASK_TOL`` grey levels, found by rendering the
same scene with and without it. ``strength`` in [0, 1] runs from faint (still above ``MASK_TOL``) to clearly
visible; for a given rng only the magnitude changes with it, never the placement.

Layout written by :func:`generate` (``000.png`` … per folder, as in MVTec-AD)::

    {product}/train/good/000.png
    {product}/test/good/000.png
    {product}/test/{defect}/000.png
    {product}/ground_truth/{defect}/000_mask.png      8-bit L, 255 inside the defect, 0 outside
    labels.csv                                         product, split, defect, strength, path, mask_path
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
from PIL import Image

from eagle.io.storage import StorageConfig, join, write_bytes

PRODUCTS: tuple[str, ...] = ("grid", "marble", "nut")
DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain", "missing")
PRODUCT_DEFECTS: dict[str, tuple[str, ...]] = {
    "grid": ("scratch", "hole", "stain"),
    "marble": ("scratch", "hole", "stain"),
    "nut": ("scratch", "hole", "stain", "missing"),
}
GRAYSCALE: frozenset[str] = frozenset({"grid"})  # written as 8-bit L PNGs, like MVTec's grid/screw/zipper
MASK_TOL = 4  # grey levels (0-255, any channel) a pixel must change by to count as defective
LABEL_COLUMNS = ("product", "split", "defect", "strength", "path", "mask_path")
_SUPERSAMPLE = 4  # shapes are drawn at 4x and area-averaged down: anti-aliased edges


@dataclass(frozen=True)
class Scene:
    """A drawn image in layers, float32 in 0..255: ``background·(1-alpha) + surface·alpha``, then lit.

    Defects edit ``surface`` (scratch, hole, stain) or ``alpha`` (missing); lighting and sensor noise are
    drawn with the scene, so the image with and without a defect differ only where the defect is.
    """

    background: np.ndarray  # (H, W, 3)
    surface: np.ndarray  # (H, W, 3) the product's face, defined everywhere
    alpha: np.ndarray  # (H, W) product coverage in [0, 1]; all ones for textures
    gain: np.ndarray  # (H, W) multiplicative lighting
    noise: np.ndarray  # (H, W, 3) additive sensor noise
    outline: Callable[[float], float] | None = None  # object only: centre-to-edge distance at an angle
    center: tuple[float, float] = (0.0, 0.0)  # object centre (x, y) in pixels

    def render(self) -> np.ndarray:
        a = self.alpha[..., None]
        img = (self.background * (1 - a) + self.surface * a) * self.gain[..., None] + self.noise
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Summary:
    """What :func:`generate` wrote: image and mask counts, per product ``{"train/good": n, ...}``."""

    root: str
    images: int
    masks: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    labels_uri: str = ""


# ---------------------------------------------------------------- drawing helpers


def _lerp(lo: float, hi: float, t: float) -> float:
    return lo + (hi - lo) * t


def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each (H, W) float32."""
    r = np.arange(size, dtype=np.float32)
    return np.meshgrid(r, r)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, octaves: int = 1) -> np.ndarray:
    """Value noise in about [-1, 1]: bicubic-upsampled random grids, halving amplitude per octave."""
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        grid = rng.uniform(-1, 1, (cells * 2**o + 1,) * 2).astype(np.float32)
        out += amp * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp /= 2
    return out / total


def _shape_alpha(size: int, draw: Callable[[np.ndarray, int], None]) -> np.ndarray:
    """Anti-aliased coverage of a shape: ``draw(canvas, scale)`` fills it at 4x (coordinates × scale)."""
    big = np.zeros((size * _SUPERSAMPLE,) * 2, np.uint8)
    draw(big, _SUPERSAMPLE)
    return cv2.resize(big, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def _pts(points: np.ndarray, scale: int) -> np.ndarray:
    """Pixel-centre float points to the integer 4x canvas cv2 draws on."""
    return np.rint((points + 0.5) * scale - 0.5).astype(np.int32)


def _lighting(rng: np.random.Generator, size: int, grayscale: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mild per-image lighting (brightness offset plus a gentle gradient) and sensor noise."""
    x, y = _coords(size)
    gx, gy = rng.uniform(-0.08, 0.08, 2)
    gain = 1 + rng.uniform(-0.06, 0.06) + (gx * (x / size - 0.5) + gy * (y / size - 0.5))
    noise = 1.5 * rng.standard_normal((size, size, 1 if grayscale else 3), dtype=np.float32)
    return gain.astype(np.float32), np.broadcast_to(noise, (size, size, 3))


def _texture(surface: np.ndarray, rng: np.random.Generator, grayscale: bool) -> Scene:
    size = surface.shape[0]
    gain, noise = _lighting(rng, size, grayscale)
    return Scene(background=np.zeros_like(surface), surface=surface,
                 alpha=np.ones((size, size), np.float32), gain=gain, noise=noise)


# ---------------------------------------------------------------- products


def _grid(rng: np.random.Generator, size: int) -> Scene:
    """A woven metal mesh: bright wires on a dark gap, random phase, period, slight rotation."""
    x, y = _coords(size)
    theta = math.radians(rng.uniform(-2, 2))
    u = x * math.cos(theta) + y * math.sin(theta)
    v = -x * math.sin(theta) + y * math.cos(theta)
    period = size / 12 * rng.uniform(0.96, 1.04)
    sigma = period * rng.uniform(0.08, 0.11)

    def wires(t: np.ndarray, phase: float) -> np.ndarray:
        d = np.mod(t + phase, period)
        d = np.minimum(d, period - d)  # distance to the nearest wire centre
        return np.exp(-0.5 * (d / sigma) ** 2)

    mesh = np.maximum(wires(u, rng.uniform(0, period)), wires(v, rng.uniform(0, period)))
    grain = _smooth_noise(rng, size, cells=max(4, size // 4))
    dark, bright = rng.uniform(55, 75), rng.uniform(170, 195)
    grey = dark + (bright - dark) * mesh + 6 * grain + 8 * _smooth_noise(rng, size, cells=3)
    return _texture(np.repeat(grey[..., None], 3, axis=2).astype(np.float32), rng, grayscale=True)


def _marble(rng: np.random.Generator, size: int) -> Scene:
    """Cream stone with grey veins bent by fractal noise; every image has its own veins and clouds."""
    x, y = _coords(size)
    turbulence = _smooth_noise(rng, size, cells=3, octaves=4)
    clouds = _smooth_noise(rng, size, cells=2, octaves=3)
    angle = rng.uniform(0, math.pi)
    along = (x * math.cos(angle) + y * math.sin(angle)) / size
    veins = np.exp(-(np.sin(2 * math.pi * rng.uniform(1.5, 3) * along + 5 * turbulence) / 0.25) ** 2)
    base = np.array([222, 216, 204], np.float32) + rng.uniform(-8, 8, 3)
    vein = np.array([120, 118, 126], np.float32) + rng.uniform(-10, 10, 3)
    w = (0.75 * veins)[..., None]
    surface = base * (1 - w) + vein * w + 10 * clouds[..., None]
    return _texture(surface.astype(np.float32), rng, grayscale=False)


def _hexagon_radius(r: float, rotation: float) -> Callable[[float], float]:
    """Centre-to-edge distance of a regular hexagon (circumradius r) in direction `phi`."""
    return lambda phi: r * math.cos(math.pi / 6) / math.cos(((phi - rotation) % (math.pi / 3)) - math.pi / 6)


def _nut(rng: np.random.Generator, size: int) -> Scene:
    """A hex nut on a dark plain background, with small jitter of position, size, rotation and colour."""
    x, y = _coords(size)
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    r = 0.33 * size * rng.uniform(0.96, 1.04)
    rotation = math.radians(rng.uniform(-8, 8))
    bore = r * rng.uniform(0.36, 0.40)
    angles = rotation + np.arange(6) * math.pi / 3
    corners = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)

    def draw(canvas: np.ndarray, s: int) -> None:
        cv2.fillPoly(canvas, [_pts(corners, s)], 255, lineType=cv2.LINE_8)
        cv2.circle(canvas, tuple(_pts(np.array([cx, cy]), s)), round(bore * s), 0, -1, lineType=cv2.LINE_8)

    alpha = _shape_alpha(size, draw)
    rho = np.hypot(x - cx, y - cy) / r
    light = math.radians(rng.uniform(0, 360))
    shade = 0.9 + 0.18 * ((x - cx) * math.cos(light) + (y - cy) * math.sin(light)) / r
    thread = 1 - 0.35 * np.exp(-(((rho - bore / r - 0.05) / 0.04) ** 2))  # dark ring of thread at the bore
    metal = np.array([150, 146, 138], np.float32) * rng.uniform(0.92, 1.08) + rng.uniform(-3, 3, 3)
    brushed = 4 * _smooth_noise(rng, size, cells=max(4, size // 8))
    surface = metal * (shade * thread)[..., None] + brushed[..., None]
    background = np.broadcast_to(np.float32(rng.uniform(28, 45)), (size, size, 3))
    gain, noise = _lighting(rng, size, grayscale=False)
    return Scene(background=background, surface=surface.astype(np.float32), alpha=alpha, gain=gain,
                 noise=noise, outline=_hexagon_radius(r, rotation), center=(cx, cy))


_SCENES: dict[str, Callable[[np.random.Generator, int], Scene]] = {"grid": _grid, "marble": _marble, "nut": _nut}


# ---------------------------------------------------------------- defects
# Each draws all its random numbers before looking at `strength`, so strength only scales the defect.


def _site(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A random point (x, y) well inside the product: on the object, or away from a texture's border."""
    size = scene.alpha.shape[0]
    inside = np.argwhere(cv2.erode((scene.alpha > 0.99).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0)
    inside = inside[(inside.min(axis=1) >= 0.1 * size) & (inside.max(axis=1) < 0.9 * size)]
    yx = inside[rng.integers(len(inside))]
    return yx[::-1].astype(np.float64) + rng.uniform(-0.5, 0.5, 2)


def _scratch(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """A thin curved line, lighter or darker than the surface."""
    size = scene.alpha.shape[0]
    mid, angle = _site(scene, rng), rng.uniform(0, math.pi)
    half = 0.5 * size * rng.uniform(0.15, 0.3)
    direction = np.array([math.cos(angle), math.sin(angle)])
    bend = np.array([-direction[1], direction[0]]) * half * rng.uniform(-0.3, 0.3)
    t = np.linspace(-1, 1, 33)[:, None]
    curve = mid + t * half * direction + (1 - t**2) * bend  # quadratic bend through the site
    width = max(1.0, size / 256 * rng.uniform(1.0, 2.0))
    sign = rng.choice([-1.0, 1.0])
    line = _shape_alpha(size, lambda c, s: cv2.polylines(c, [_pts(curve, s)], False, 255,
                                                         thickness=round(width * s), lineType=cv2.LINE_8))
    contrast = _lerp(18, 90, strength)
    return replace(scene, surface=scene.surface + (sign * contrast * line)[..., None])


def _hole(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """A small dark pit, slightly elliptical."""
    size = scene.alpha.shape[0]
    centre, axes_scale = _site(scene, rng), rng.uniform(0.75, 1.0)
    radius_t, angle = rng.uniform(0, 1), rng.uniform(0, 180)
    radius = max(1.5, size * _lerp(0.012, 0.02, radius_t)) * _lerp(1, 1.8, strength)
    axes = np.array([radius, radius * axes_scale])
    pit = _shape_alpha(size, lambda c, s: cv2.ellipse(c, tuple(_pts(centre, s)), tuple(np.rint(axes * s).astype(int)),
                                                       angle, 0, 360, 255, -1, lineType=cv2.LINE_8))
    darkness = _lerp(0.3, 0.85, strength)
    return replace(scene, surface=scene.surface * (1 - darkness * pit)[..., None])


_STAIN_COLOURS = np.array([[140, 70, 25], [40, 38, 30], [45, 70, 150], [60, 110, 50]], np.float32)


def _stain(scene: Scene, strength: float, rng: np.random.Generator, grayscale: bool) -> Scene:
    """An irregular soft blob tinting the surface towards a stain colour (dark grey on grey products)."""
    size = scene.alpha.shape[0]
    x, y = _coords(size)
    (cx, cy), angle = _site(scene, rng), rng.uniform(0, math.pi)
    radius = size * rng.uniform(0.04, 0.08)
    aspect = rng.uniform(0.6, 1.0)
    edge = 0.25 * _smooth_noise(rng, size, cells=max(4, size // 24))
    colour = np.full(3, 25, np.float32) if grayscale else _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))]
    u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
    v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
    rho = np.hypot(u, v / aspect) / radius
    blob = np.clip((1 - rho + edge) / 0.3, 0, 1) * _lerp(0.18, 0.75, strength)
    surface = scene.surface * (1 - blob[..., None]) + colour * blob[..., None]
    return replace(scene, surface=surface.astype(np.float32))


def _missing(scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    """A chunk broken off the object's outline, showing the background behind it."""
    if scene.outline is None:
        raise ValueError("'missing' needs an object product")
    size = scene.alpha.shape[0]
    phi = rng.uniform(0, 2 * math.pi)
    reach = scene.outline(phi)
    centre = np.array(scene.center) + reach * np.array([math.cos(phi), math.sin(phi)])
    radius = reach * _lerp(0.15, 0.4, strength)
    chunk = _shape_alpha(size, lambda c, s: cv2.circle(c, tuple(_pts(centre, s)), round(radius * s), 255, -1,
                                                        lineType=cv2.LINE_8))
    return replace(scene, alpha=scene.alpha * (1 - chunk))


def _apply(product: str, defect: str, scene: Scene, strength: float, rng: np.random.Generator) -> Scene:
    if defect == "scratch":
        return _scratch(scene, strength, rng)
    if defect == "hole":
        return _hole(scene, strength, rng)
    if defect == "stain":
        return _stain(scene, strength, rng, grayscale=product in GRAYSCALE)
    return _missing(scene, strength, rng)


# ---------------------------------------------------------------- public in-memory API


def _check(product: str, defect: str | None = None, size: int = 256) -> None:
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if product not in _SCENES:
        raise ValueError(f"unknown product {product!r}; known: {', '.join(PRODUCTS)}")
    if defect is not None and defect not in PRODUCT_DEFECTS[product]:
        raise ValueError(f"{product!r} has no defect {defect!r}; it has: {', '.join(PRODUCT_DEFECTS[product])}")


def render_normal(product: str, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A defect-free image of `product`, (size, size, 3) uint8 RGB."""
    _check(product, size=size)
    return _SCENES[product](rng, size).render()


def render_defect(product: str, defect: str, strength: float, rng: np.random.Generator,
                  size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """An image with one defect and its exact mask: (size, size, 3) uint8 RGB and (size, size) bool.

    The scene is drawn from `rng` exactly as :func:`render_normal` draws it, so replaying the same rng
    state through ``render_normal`` gives the defect-free twin; the mask marks every pixel where the two
    differ by more than ``MASK_TOL`` in any channel, and no other.
    """
    _check(product, defect, size)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    scene = _SCENES[product](rng, size)
    normal = scene.render()
    image = _apply(product, defect, scene, strength, rng).render()
    mask = np.abs(image.astype(np.int16) - normal).max(axis=2) > MASK_TOL
    if not mask.any():  # cannot happen with the ranges above; an empty mask would silently mislabel
        raise RuntimeError(f"{product}/{defect} at strength {strength} changed no pixel")
    return image, mask


def image_rng(seed: int, product: str, folder: str, index: int) -> np.random.Generator:
    """The generator for one image, independent of how many other images are made (stable across runs)."""
    return np.random.default_rng([seed, zlib.crc32(product.encode()), zlib.crc32(folder.encode()), index])


def strengths(n: int) -> list[float]:
    """`n` strengths spread evenly over (0, 1): faint to clearly visible."""
    return [round((i + 0.5) / n, 4) for i in range(n)]


def _png(array: np.ndarray, grayscale: bool = False) -> bytes:
    buf = io.BytesIO()
    # Level 1: 4x faster than PIL's default 6 on these noisy images, for files about 15% larger.
    Image.fromarray(array[..., 0] if grayscale else array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def generate(root: str, products: Sequence[str] = PRODUCTS, n_train: int = 20, n_test_good: int = 6,
             n_test_defect: int = 3, size: int = 256, seed: int = 0,
             storage: StorageConfig | None = None) -> Summary:
    """Write an MVTec-AD-layout dataset under `root` (local path or ``s3://`` prefix) plus ``labels.csv``.

    Image names restart at ``000.png`` in each folder; each image has its own rng (see :func:`image_rng`),
    so the same seed gives byte-identical files and adding images leaves the existing ones unchanged.
    """
    for product in products:
        _check(product, size=size)
    rows: list[dict[str, str]] = []
    counts: dict[str, dict[str, int]] = {}
    masks = 0
    with ThreadPoolExecutor(max_workers=8) as pool:  # uploads overlap rendering; S3 PUTs dominate otherwise
        pending = []

        def put(rel: str, data: bytes) -> None:
            pending.append(pool.submit(write_bytes, join(root, rel), data, storage))

        for product in products:
            gray = product in GRAYSCALE
            folders = [("train", "good", n_train), ("test", "good", n_test_good)]
            folders += [("test", d, n_test_defect) for d in PRODUCT_DEFECTS[product]]
            counts[product] = {}
            for split, defect, n in folders:
                folder = f"{split}/{defect}"
                counts[product][folder] = n
                for i, strength in enumerate(strengths(n)):
                    rng = image_rng(seed, product, folder, i)
                    path = f"{product}/{folder}/{i:03d}.png"
                    row = {"product": product, "split": split, "defect": defect, "strength": "",
                           "path": path, "mask_path": ""}
                    if defect == "good":
                        put(path, _png(render_normal(product, rng, size), gray))
                    else:
                        image, mask = render_defect(product, defect, strength, rng, size)
                        row["strength"] = f"{strength:g}"
                        row["mask_path"] = f"{product}/ground_truth/{defect}/{i:03d}_mask.png"
                        put(path, _png(image, gray))
                        put(row["mask_path"], _png(mask.astype(np.uint8) * 255))
                        masks += 1
                    rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        labels_uri = join(root, "labels.csv")
        put("labels.csv", buf.getvalue().encode())
        for future in pending:
            future.result()
    return Summary(root=root, images=len(rows), masks=masks, counts=counts, labels_uri=labels_uri)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eagle-synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="local folder or s3:// prefix to write into")
    parser.add_argument("--products", default=",".join(PRODUCTS), help=f"comma-separated, from {','.join(PRODUCTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--n-train", type=int, default=20, help="normal training images per product")
    parser.add_argument("--n-test-good", type=int, default=6, help="normal test images per product")
    parser.add_argument("--n-test-defect", type=int, default=3, help="test images per product and defect kind")
    args = parser.parse_args(argv)
    products = [p.strip() for p in args.products.split(",") if p.strip()]
    try:
        summary = generate(args.out, products, n_train=args.n_train, n_test_good=args.n_test_good,
                           n_test_defect=args.n_test_defect, size=args.size, seed=args.seed)
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps({"root": summary.root, "images": summary.images, "masks": summary.masks,
                      "labels": summary.labels_uri, "counts": summary.counts}))


if __name__ == "__main__":
    main()
