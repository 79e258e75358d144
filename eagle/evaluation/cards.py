"""Example cards of the report: which images to show, and each as the image, its anomaly map, the expert's
mask and boxes, the ground truth, and a click-to-enlarge full-resolution crop (CSS ``:target``, no script).

Colours: red = the expert (boxes; on the map, its mask outline in white), green = the ground-truth outline.
Pictures are JPEG within a byte budget each (busy textures get a lower quality, then fewer pixels), so a card
costs at most about 23 KB of HTML, text included, and 15 products with 12 cards stay under 5 MB whatever the
images.
"""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from eagle.config import InputConfig, StorageConfig
from eagle.evaluation.ground_truth import Truth, read_mask
from eagle.evaluation.markup import esc, format_value, slug
from eagle.evaluation.scorecard import ProductResult, score_map
from eagle.expert.regions import decode_gray_png
from eagle.io import storage
from eagle.io.images import decode_image

THUMB = 200  # longer side of each card panel, pixels
CROP_MIN, CROP_MAX = 256, 512  # side of the enlarged crop around the strongest region, original pixels / at most
QUALITIES = (75, 60, 45, 30)  # JPEG qualities tried in turn until a picture fits its budget
IMAGE_BYTES, MAP_BYTES, CROP_BYTES = 5_000, 2_500, 8_000  # budgets per picture
RED, GREEN, WHITE = (255, 0, 0), (0, 230, 0), (255, 255, 255)
Pair = tuple[dict[str, Any], Truth]

# (title, how many) in gallery order; see pick_examples.
QUOTAS = (("errors introduced by the MLLM", 2), ("false positives the expert made too", 2),
          ("false negatives the expert made too", 2), ("errors fixed by the MLLM", 2),
          ("correct: defects found closest to the threshold", 2), ("correct: normal images scored highest", 2))


def _anomalous(row: dict[str, Any], key: str) -> bool:
    return row[key] == "anomalous"


def _score(pair: Pair) -> float:
    return pair[0]["expert_score"]


def _margin(pair: Pair) -> float:
    return -abs(_score(pair) - pair[0]["threshold"])


def introduced(pairs: list[Pair]) -> list[Pair]:
    """Errors the MLLM introduced (the expert right, the final verdict wrong), the expert's surest first."""
    return sorted((p for p in pairs if _anomalous(p[0], "expert_verdict") == p[1].anomalous
                   != _anomalous(p[0], "verdict")), key=_margin)


def pick_examples(result: ProductResult) -> dict[str, tuple[list[Pair], int]]:
    """Per gallery (QUOTAS): the examples shown and how many there are. Errors the MLLM introduced (the expert's
    surest first); errors of the final verdict the expert made too (false positives highest score first, false
    negatives lowest first); expert errors the MLLM fixed (furthest from the threshold first); and correct
    images of both kinds nearest to a mistake."""
    pairs = list(zip(result.rows, result.truths))
    expert_wrong = [p for p in pairs if _anomalous(p[0], "expert_verdict") != p[1].anomalous]
    fp = [p for p in expert_wrong if not p[1].anomalous and _anomalous(p[0], "verdict")]
    fn = [p for p in expert_wrong if p[1].anomalous and not _anomalous(p[0], "verdict")]
    fixed = [p for p in expert_wrong if _anomalous(p[0], "verdict") == p[1].anomalous]
    right = [p for p in pairs if _anomalous(p[0], "expert_verdict") == p[1].anomalous == _anomalous(p[0], "verdict")]
    chosen = [introduced(pairs), sorted(fp, key=lambda p: -_score(p)), sorted(fn, key=_score),
              sorted(fixed, key=_margin), sorted((p for p in right if p[1].anomalous), key=_score),
              sorted((p for p in right if not p[1].anomalous), key=lambda p: -_score(p))]
    return {title: (found[:n], len(found)) for (title, n), found in zip(QUOTAS, chosen)}


def jpeg_uri(rgb: np.ndarray, budget: int) -> str:
    """A JPEG data URI of at most `budget` bytes (before base64): the first of QUALITIES that fits, else the
    picture shrinks by a quarter and the qualities are tried again."""
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    while True:
        for quality in QUALITIES:
            data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
            if len(data) <= budget or min(bgr.shape[:2]) < 16:
                return "data:image/jpeg;base64," + base64.b64encode(data).decode()
        bgr = cv2.resize(bgr, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)


def _outline(canvas: np.ndarray, mask: np.ndarray | None, colour: tuple[int, int, int]) -> None:
    """Draw `mask`'s outline, resized (nearest) to `canvas`, onto it."""
    if mask is None or not mask.any():
        return
    small = _resize_mask(mask, (canvas.shape[1], canvas.shape[0]))
    contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, colour, 1)


def _boxes(canvas: np.ndarray, row: dict[str, Any], scale: float, origin: tuple[int, int] = (0, 0)) -> None:
    for box in row["boxes"] or []:
        cv2.rectangle(canvas, (round((box["x1"] - origin[0]) * scale), round((box["y1"] - origin[1]) * scale)),
                      (round((box["x2"] - origin[0]) * scale) - 1, round((box["y2"] - origin[1]) * scale) - 1),
                      RED, 2)


def crop_window(focus: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """A square (as far as the image allows) around the (x1, y1, x2, y2) region: its longer side plus half,
    at least CROP_MIN, inside the image."""
    x1, y1, x2, y2 = focus
    side = min(max(CROP_MIN, round(1.5 * max(x2 - x1, y2 - y1))), width, height)
    left = min(max(0, (x1 + x2 - side) // 2), width - side)
    top = min(max(0, (y1 + y2 - side) // 2), height - side)
    return left, top, left + side, top + side


def _focus(row: dict[str, Any], box_scale: float, truth_mask: np.ndarray | None, heat: np.ndarray | None,
           width: int, height: int) -> tuple[int, int, int, int]:
    """Where to crop, in image pixels: the strongest box, else the ground-truth region, else the map's peak."""
    if row["boxes"]:
        b = row["boxes"][0]
        return tuple(round(b[k] * box_scale) for k in ("x1", "y1", "x2", "y2"))
    if truth_mask is not None and truth_mask.any():
        ys, xs = np.nonzero(truth_mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if heat is not None:
        y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        cx, cy = round((x + 0.5) * width / heat.shape[1]), round((y + 0.5) * height / heat.shape[0])
        return cx, cy, cx + 1, cy + 1
    return width // 2, height // 2, width // 2 + 1, height // 2 + 1


@dataclass(frozen=True)
class Pictures:
    """A card's JPEG data URIs: the image panel, the map panel (None without a map), and the crop."""

    image: str
    heat: str | None
    crop: str
    crop_note: str


def _map_panel(heat: np.ndarray, row: dict[str, Any], truth_mask: np.ndarray | None, size: tuple[int, int],
               map_scale: float) -> np.ndarray:
    """The map coloured from 0 to `map_scale` score units, with the expert's mask and the truth outlined."""
    levels = np.clip(heat / map_scale * 255, 0, 255).astype(np.uint8)
    coloured = cv2.cvtColor(cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    coloured = cv2.resize(coloured, size, interpolation=cv2.INTER_LINEAR)
    _outline(coloured, decode_gray_png(row["mask_png"]) > 0 if row["mask_png"] else None, WHITE)
    _outline(coloured, truth_mask, GREEN)
    return coloured


def _crop(image: np.ndarray, window: tuple[int, int, int, int], row: dict[str, Any], box_scale: float,
          truth_mask: np.ndarray | None) -> np.ndarray:
    """The window at full resolution (at most CROP_MAX a side), boxes and truth outline drawn in."""
    x1, y1, x2, y2 = window
    crop = image[y1:y2, x1:x2].copy()
    scale = min(1.0, CROP_MAX / max(crop.shape[:2]))
    if scale < 1:
        crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    _boxes(crop, row, scale * box_scale, (round(x1 / box_scale), round(y1 / box_scale)))
    _outline(crop, truth_mask[y1:y2, x1:x2] if truth_mask is not None else None, GREEN)
    return crop


def pictures(row: dict[str, Any], truth: Truth, map_scale: float, cfg: StorageConfig | None = None) -> Pictures:
    """Draw a card's pictures. Boxes are in the row's image size, which is the decoded image's unless the image
    changed since."""
    image = decode_image(storage.read_bytes(row["image_uri"], cfg), InputConfig().max_image_pixels)
    h, w = image.shape[:2]
    union = read_mask(truth, cfg)
    truth_mask = _resize_mask(union, (w, h)) > 0 if union is not None else None
    scale, box_scale = THUMB / max(h, w), w / (row["width"] or w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    panel = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    _boxes(panel, row, scale * box_scale)
    _outline(panel, truth_mask, GREEN)
    heat = score_map(row) if row["anomaly_map_png"] is not None and row["map_max"] is not None else None
    heat_uri = jpeg_uri(_map_panel(heat, row, truth_mask, size, map_scale), MAP_BYTES) if heat is not None else None
    x1, y1, x2, y2 = window = crop_window(_focus(row, box_scale, truth_mask, heat, w, h), w, h)
    crop = _crop(image, window, row, box_scale, truth_mask)
    return Pictures(jpeg_uri(panel, IMAGE_BYTES), heat_uri, jpeg_uri(crop, CROP_BYTES),
                    f"x {x1}–{x2}, y {y1}–{y2} of {w}×{h} px")


def _right(row: dict[str, Any], key: str, truth: Truth) -> str:
    ok = _anomalous(row, key) == truth.anomalous
    who = "expert" if key == "expert_verdict" else "final"
    return f'<span class="tag {"ok" if ok else "bad"}">{who} {"right" if ok else "wrong"}</span>'


def card(row: dict[str, Any], truth: Truth, ident: str, map_scale: float, cfg: StorageConfig | None = None) -> str:
    """One example: panels that enlarge to the crop on click, the facts, and the explanation."""
    try:
        pics = pictures(row, truth, map_scale, cfg)
        heat = (f'<img alt="anomaly map" src="{pics.heat}">' if pics.heat
                else '<span class="nomap">no anomaly map</span>')
        picture = (f'<a class="zoom" href="#zoom-{ident}" title="enlarge: full-resolution crop">'
                   f'<img alt="{esc(truth.path)}" src="{pics.image}">{heat}</a>'
                   f'<div class="lightbox" id="zoom-{ident}"><a class="close" href="#card-{ident}">close ×</a>'
                   f'<img alt="crop of {esc(truth.path)}" src="{pics.crop}">'
                   f"<p>{esc(truth.path)}: {esc(pics.crop_note)}</p></div>")
    except (OSError, ValueError) as exc:  # a missing or undecodable image must not cost the report
        picture = f'<p class="muted">image unavailable: {esc(exc)}</p>'
    answer = row["answer"] or "not asked"
    if row["mllm_ran"]:
        answer += " (guided)" if row["guided"] else " (unguided)"
    band = (row["confidence"] or "").replace("_", " ")
    facts = [("truth", truth.defect),
             ("score", f"{row['expert_score']:.4g} (threshold {format_value(row['threshold'])}"
                       + (f", {band})" if band else ")")),
             ("expert", row["expert_verdict"]), ("MLLM", answer), ("final", row["verdict"])]
    said = ""
    if row.get("mllm_reply"):  # the MLLM's own words when they were not a clear yes/no
        said = f'<p class="reply"><span class="muted">MLLM raw reply:</span> <q>{esc(row["mllm_reply"])}</q></p>'
    source = "MLLM reply" if row.get("explanation_source") == "mllm" else "expert"
    return (f'<article class="card" id="card-{ident}">{picture}<p class="path">{esc(truth.path)}</p>'
            f'<p>{_right(row, "expert_verdict", truth)} {_right(row, "verdict", truth)}</p>'
            f'<dl>{"".join(f"<dt>{k}</dt><dd>{esc(v)}</dd>" for k, v in facts)}</dl>{said}'
            f'<p class="explanation"><span class="muted">{source}:</span> {esc(row["explanation"] or "")}</p>'
            f"</article>")


def map_scale(result: ProductResult) -> float:
    """The colour scale of a product's maps: twice its median threshold, so the threshold sits mid-scale and
    maps compare across a product's images."""
    thresholds = [r["threshold"] for r in result.rows if r["threshold"] is not None and r["threshold"] > 0]
    return 2 * float(np.median(thresholds)) if thresholds else 1.0


def shown(n: int, total: int) -> str:
    return f'<span class="count">({n} of {total} shown)</span>'


def gallery(result: ProductResult, cfg: StorageConfig | None = None) -> str:
    """Every example group of a product as a titled grid of cards, each title with "n of m shown"."""
    parts, scale, prefix = [], map_scale(result), slug(result.product)
    with ThreadPoolExecutor(max_workers=8) as pool:  # images read from S3: overlap the GETs
        for g, (title, (pairs, total)) in enumerate(pick_examples(result).items()):
            idents = [f"{prefix}-{g}-{i}" for i in range(len(pairs))]
            cards = list(pool.map(lambda pair, ident: card(*pair, ident, scale, cfg), pairs, idents))
            body = f'<div class="gallery">{"".join(cards)}</div>' if cards else f'<p class="muted">No {title}.</p>'
            parts.append(f"<h3>{esc(title[0].upper() + title[1:])} {shown(len(pairs), total)}</h3>{body}")
    return "".join(parts)


def introduced_gallery(results: list[ProductResult], k: int = 4, cfg: StorageConfig | None = None) -> str:
    """The errors the MLLM introduced over every product (the expert's surest first), `k` at most, each with
    what the MLLM said."""
    found = [(pair, result) for result in results for pair in introduced(list(zip(result.rows, result.truths)))]
    found.sort(key=lambda x: _margin(x[0]))
    picked = found[:k]
    with ThreadPoolExecutor(max_workers=8) as pool:
        cards = list(pool.map(lambda i: card(*picked[i][0], f"introduced-{i}", map_scale(picked[i][1]), cfg),
                              range(len(picked))))
    body = (f'<div class="gallery">{"".join(cards)}</div>' if cards
            else '<p class="muted">The MLLM introduced no errors.</p>')
    return (f'<div id="introduced"><h3>Errors the MLLM introduced {shown(len(picked), len(found))}</h3>'
            f'<p class="note">The expert was right and the MLLM overrode it; each card shows what the MLLM '
            f"replied.</p>{body}</div>")
