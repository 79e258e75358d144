"""A held-out set for accuracy claims: real photographed textures (scikit-image's bundled brick, gravel and grass)
with defect kinds that nothing else in the project generates (crack, warp, blur, spots), in the MVTec-AD layout
with masks and ``labels.csv`` (the columns of `eagle.testing.synth`).

Neither the products nor the defect kinds are the synthetic set's (grid, marble, nut; scratch, hole, stain,
missing), so settings chosen on that set are judged here on data they were not tuned to. Normal images are
random crops of the photograph (position, scale, flips, quarter turns, brightness and contrast jitter); a
defect's strength runs from barely visible to clear (`eagle.testing.synth.strengths`).

    python bench/heldout.py /tmp/heldout                     # 60 train, 50 normal + 4x10 defective test each
    python bench/compare_experts.py --data /tmp/heldout --products brick,gravel,grass \\
        --backbone tf_efficientnet_lite0 --weights imagenet --size 224 --anomalib --routing
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from eagle.testing.synth import LABEL_COLUMNS, strengths

PRODUCTS = ("brick", "gravel", "grass")
DEFECTS = ("crack", "warp", "blur", "spots")


def source(product: str) -> np.ndarray:
    from skimage import data

    return getattr(data, product)()


def normal(photo: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop of the photograph as a size x size RGB image."""
    side = int(rng.integers(int(0.4 * photo.shape[0]), int(0.55 * photo.shape[0])))
    y, x = (int(rng.integers(0, photo.shape[i] - side)) for i in (0, 1))
    crop = np.rot90(photo[y:y + side, x:x + side], int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    img = cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    img = (img - img.mean()) * rng.uniform(0.9, 1.1) + img.mean() * rng.uniform(0.92, 1.08)
    return np.repeat(np.clip(img, 0, 255)[..., None], 3, axis=2).astype(np.uint8)


def _centre(rng: np.random.Generator, size: int) -> tuple[int, int]:
    return int(rng.integers(size // 5, 4 * size // 5)), int(rng.integers(size // 5, 4 * size // 5))


def crack(img: np.ndarray, s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A jagged dark line: longer, wider and darker with strength."""
    size = img.shape[0]
    pts, (x, y) = [], _centre(rng, size)
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(6 + 10 * s)):
        pts.append((x, y))
        angle += rng.normal(0, 0.5)
        step = size * (0.015 + 0.02 * s)
        x, y = int(np.clip(x + step * np.cos(angle), 0, size - 1)), int(np.clip(y + step * np.sin(angle), 0, size - 1))
    mask = np.zeros((size, size), np.uint8)
    cv2.polylines(mask, [np.array(pts, np.int32)], False, 1, thickness=1 + int(2 * s))
    out = img.astype(np.float32)
    out[mask > 0] *= 1.0 - (0.25 + 0.5 * s)
    return out.clip(0, 255).astype(np.uint8), mask > 0


def warp(img: np.ndarray, s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A local swirl: the texture twisted inside a disk, more with strength."""
    size = img.shape[0]
    cx, cy = _centre(rng, size)
    radius = size * (0.07 + 0.08 * s)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    r = np.sqrt(dx ** 2 + dy ** 2)
    twist = (0.6 + 2.4 * s) * np.clip(1 - r / radius, 0, 1) ** 2
    cos, sin = np.cos(twist), np.sin(twist)
    map_x, map_y = cx + dx * cos - dy * sin, cy + dx * sin + dy * cos
    out = cv2.remap(img, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    moved = np.hypot(map_x - xx, map_y - yy) > 0.5
    return out, moved


def blur(img: np.ndarray, s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A smeared patch: an ellipse of the image blurred, larger and blurrier with strength."""
    size = img.shape[0]
    cx, cy = _centre(rng, size)
    mask = np.zeros((size, size), np.uint8)
    axes = (int(size * (0.05 + 0.08 * s)), int(size * (0.04 + 0.06 * s)))
    cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 2)[..., None]
    blurred = cv2.GaussianBlur(img, (0, 0), 0.8 + 3.5 * s)
    out = img * (1 - soft) + blurred * soft
    return out.clip(0, 255).astype(np.uint8), mask > 0


def spots(img: np.ndarray, s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A cluster of small bright or dark dots: more and more contrasted with strength."""
    size = img.shape[0]
    cx, cy = _centre(rng, size)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(3 + int(6 * s)):
        x, y = (int(np.clip(c + rng.normal(0, size * 0.03), 0, size - 1)) for c in (cx, cy))
        cv2.circle(mask, (x, y), int(rng.integers(1, 3 + int(2 * s))), 1, -1)
    sign = 1 if rng.random() < 0.5 else -1
    out = img.astype(np.float32)
    out[mask > 0] += sign * (25 + 90 * s)
    return out.clip(0, 255).astype(np.uint8), mask > 0


KINDS: dict[str, Callable[[np.ndarray, float, np.random.Generator], tuple[np.ndarray, np.ndarray]]] = {
    "crack": crack, "warp": warp, "blur": blur, "spots": spots}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    path.write_bytes(buf.getvalue())


def generate(root: str, products: tuple[str, ...] = PRODUCTS, n_train: int = 60, n_test_good: int = 50,
             n_test_defect: int = 10, size: int = 224, seed: int = 7) -> int:
    """Write the set under `root`; returns the number of images."""
    base, rows = Path(root), []
    for p_index, product in enumerate(products):
        photo = source(product)
        rng = np.random.default_rng([seed, p_index])
        for split, n in (("train", n_train), ("test", n_test_good)):
            for i in range(n):
                path = f"{product}/{split}/good/{i:03d}.png"
                _png(base / path, normal(photo, rng, size))
                rows.append({"product": product, "split": split, "defect": "good", "strength": "", "path": path,
                             "mask_path": ""})
        for kind in DEFECTS:
            for i, strength in enumerate(strengths(n_test_defect)):
                image, mask = KINDS[kind](normal(photo, rng, size), strength, rng)
                path, mask_path = f"{product}/test/{kind}/{i:03d}.png", f"{product}/ground_truth/{kind}/{i:03d}_mask.png"
                _png(base / path, image)
                _png(base / mask_path, mask.astype(np.uint8) * 255)
                rows.append({"product": product, "split": "test", "defect": kind, "strength": f"{strength:g}",
                             "path": path, "mask_path": mask_path})
    with open(base / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root")
    p.add_argument("--products", default=",".join(PRODUCTS))
    p.add_argument("--n-train", type=int, default=60)
    p.add_argument("--n-test-good", type=int, default=50)
    p.add_argument("--n-test-defect", type=int, default=10, help="per defect kind")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    n = generate(args.root, tuple(args.products.split(",")), args.n_train, args.n_test_good, args.n_test_defect,
                 args.size, args.seed)
    print(f"{n} images under {args.root}")


if __name__ == "__main__":
    main()
