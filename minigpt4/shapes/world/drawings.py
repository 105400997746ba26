"""The shapes world's drawings: each class as a list of primitives in a unit frame ([-1, 1]^2, y down),
filled with 255 (ink) or 0 (a hole: ring, moon, the house's door), drawn in order onto an anti-aliased mask.

Kept apart from `scenes.py` (classes, scenes, captions, the file writer), which draws through
`shape_mask`; this module needs nothing from it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 4  # masks are drawn 4x larger and box-filtered down: smooth edges on 64-pixel images


def _regular_polygon(corners: int, inner: float | None = None, turn: float = -np.pi / 2) -> list:
    steps = corners * (2 if inner else 1)
    points = []
    for k in range(steps):
        r = inner if inner and k % 2 else 1.0
        angle = turn + 2 * np.pi * k / steps
        points.append((r * np.cos(angle), r * np.sin(angle)))
    return points


SHAPE_PRIMITIVES: dict[str, list[tuple[str, list, int]]] = {
    "circle": [("ellipse", [(-1, -1), (1, 1)], 255)],
    "square": [("polygon", [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 255)],
    "star": [("polygon", _regular_polygon(5, inner=0.42), 255)],
    "tree": [("polygon", [(0, -1), (0.55, -0.15), (-0.55, -0.15)], 255),
             ("polygon", [(0, -0.55), (0.8, 0.5), (-0.8, 0.5)], 255),
             ("polygon", [(-0.18, 0.5), (0.18, 0.5), (0.18, 1), (-0.18, 1)], 255)],
    "ring": [("ellipse", [(-1, -1), (1, 1)], 255), ("ellipse", [(-0.55, -0.55), (0.55, 0.55)], 0)],
    "triangle": [("polygon", [(0, -0.95), (0.95, 0.75), (-0.95, 0.75)], 255)],
    "heart": [("ellipse", [(-1, -0.8), (0.05, 0.2)], 255), ("ellipse", [(-0.05, -0.8), (1, 0.2)], 255),
              ("polygon", [(-0.96, -0.15), (0.96, -0.15), (0, 1)], 255)],
    "diamond": [("polygon", [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)], 255)],
    "hexagon": [("polygon", _regular_polygon(6, turn=0.0), 255)],
    "bar": [("polygon", [(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)], 255)],
    "ellipse": [("ellipse", [(-1, -0.55), (1, 0.55)], 255)],
    "moon": [("ellipse", [(-1, -1), (1, 1)], 255), ("ellipse", [(-0.4, -1.05), (1.3, 0.65)], 0)],
    "house": [("polygon", [(-0.75, 1), (-0.75, -0.1), (0, -0.9), (0.75, -0.1), (0.75, 1)], 255),
              ("polygon", [(-0.2, 0.35), (0.2, 0.35), (0.2, 1), (-0.2, 1)], 0)],
    "arrow": [("polygon", [(-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22),
                           (-1, 0.22)], 255)],
    "bolt": [("polygon", [(0.2, -1), (-0.6, 0.15), (-0.05, 0.15), (-0.25, 1), (0.6, -0.2),
                          (0.05, -0.2), (0.4, -1)], 255)],
}


def shape_mask(name: str, x: float, y: float, radius: float, size: int) -> np.ndarray:
    """uint8 [size, size] coverage (0..255, anti-aliased) of shape `name` centred at (x, y) pixels."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)

    def to_pixels(points: list) -> list[tuple[float, float]]:
        return [((x + u * radius) * SUPERSAMPLE, (y + v * radius) * SUPERSAMPLE) for u, v in points]

    for kind, points, fill in SHAPE_PRIMITIVES[name]:
        if kind == "ellipse":
            draw.ellipse(to_pixels(points), fill=fill)
        else:
            draw.polygon(to_pixels(points), fill=fill)
    return np.asarray(canvas.reduce(SUPERSAMPLE))
