"""An independent judge of images of the shapes world, from pixel statistics alone (no model).

Background = the median border colour; objects = 4-connected regions that differ from it; colour =
the palette colour nearest to most of a region's strongly coloured pixels; shape from geometry:
solidity (area over convex-hull area) picks the star, then the fill ratio of the bounding box
separates square (~1), circle (~0.79) and triangle (~0.5)."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .shapes import COLOURS

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float32)


@dataclass
class DetectedObject:
    """What the checker sees in one region."""

    colour: str
    shape: str
    position: str
    area: int
    fill_ratio: float
    solidity: float


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected regions of a boolean mask, as arrays of (row, col)."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    regions = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        regions.append(np.array(pixels))
    return regions


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def classify_shape(fill_ratio: float, solidity: float) -> str:
    """Shape name from the region's geometry."""
    if solidity < 0.8:
        return "star"
    if fill_ratio > 0.88:
        return "square"
    if fill_ratio > 0.64:
        return "circle"
    return "triangle"


def _position(row: float, col: float, side: int) -> str:
    dx, dy = col / side - 0.5, row / side - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def detect_objects(image, threshold: float = 70.0, min_area_fraction: float = 0.01) -> list[DetectedObject]:
    """The objects in an image (PIL image or uint8 array [H, W, 3]), largest first."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    mask = distance > threshold
    found = []
    for region in _components(mask):
        if len(region) < min_area_fraction * height * width:
            continue
        rows, cols = region[:, 0], region[:, 1]
        # colour: the strongest half of the region's pixels (edges blend into the background)
        strength = distance[rows, cols]
        strong = pixels[rows, cols][strength >= np.median(strength)]
        nearest = np.linalg.norm(strong[:, None, :] - _PALETTE[None], axis=-1).argmin(1)
        colour = _PALETTE_NAMES[Counter(nearest.tolist()).most_common(1)[0][0]]
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        corners = np.concatenate([region + offset for offset in ((0, 0), (0, 1), (1, 0), (1, 1))])
        hull = _hull_area(corners)
        fill, solidity = len(region) / box, (len(region) / hull if hull else 0.0)
        found.append(DetectedObject(colour, classify_shape(fill, solidity),
                                    _position(rows.mean() + 0.5, cols.mean() + 0.5, max(height, width)),
                                    len(region), round(fill, 3), round(solidity, 3)))
    return sorted(found, key=lambda o: -o.area)


def judge_image(image, colour: str, shape: str, position: str | None = None) -> dict:
    """Does the image's largest object have this colour and shape (and position, when given)?
    Returns the verdicts and what was seen."""
    objects = detect_objects(image)
    seen = objects[0] if objects else None
    verdict = {
        "colour": seen is not None and seen.colour == colour,
        "shape": seen is not None and seen.shape == shape,
        "seen": seen,
    }
    if position is not None:
        verdict["position"] = seen is not None and seen.position == position
    return verdict
