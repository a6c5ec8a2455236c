"""Deterministic generator of a small demo image set in the Fruits-360 layout.

``<root>/<Label>/r0_<n>.jpg``: 100x100 RGB JPEGs of one synthetic fruit on a white background.
Used by the demo command, the tests and the benchmarks, so it only needs Pillow, numpy and the
standard library, and it is fast enough to make thousands of images.

Determinism: a label's look depends only on its index; each image's jitter comes from a numpy
Generator seeded with ``(seed, label index, image index)``, so a 24x100 set starts with exactly
the same files as a 24x3 set, and re-running rewrites identical bytes.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pathlib
import sys
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_LABELS = 24
DEFAULT_IMAGES_PER_LABEL = 3

SIZE = 100  # Fruits-360 image size
_SS = 2  # shapes are drawn at 2x and reduced, which gives cheap anti-aliasing
_JPEG_QUALITY = 90
_STEM = (110, 70, 30)
_LEAF = (40, 140, 40)


@dataclass(frozen=True)
class _Spec:
    name: str
    rgb: tuple[int, int, int]
    shape: str  # one of the branches of _draw_body
    size: float  # object radius as a fraction of half the image
    aspect: float = 1.0  # height / width for shapes that use it
    extras: tuple[str, ...] = ()  # "stem", "leaf"
    texture: float = 4.0  # std-dev of per-pixel colour noise


# Curated classes: names contain no digits, so "<name> <k>" variants can never collide with them.
# Colours, shapes and sizes are chosen so every pair differs clearly in mean colour or size.
_CURATED = (
    _Spec("Apple Red", (190, 25, 35), "circle", 0.78, 0.95, ("stem", "leaf")),
    _Spec("Apple Golden", (225, 185, 55), "circle", 0.74, 0.95, ("stem",)),
    _Spec("Apple Granny Smith", (125, 195, 65), "circle", 0.72, 0.95, ("stem",)),
    _Spec("Banana", (245, 220, 40), "crescent", 0.88),
    _Spec("Lemon", (250, 245, 120), "ellipse", 0.66, 0.72),
    _Spec("Lime", (70, 160, 40), "ellipse", 0.50, 0.85),
    _Spec("Orange", (245, 135, 15), "circle", 0.82, 1.0, (), 7.0),
    _Spec("Grape Blue", (65, 45, 120), "grapes", 0.68, 1.0, ("stem",)),
    _Spec("Grape White", (195, 215, 125), "grapes", 0.64, 1.0, ("stem",)),
    _Spec("Cherry", (140, 10, 40), "circle", 0.40, 0.95, ("stem",)),
    _Spec("Strawberry", (225, 45, 65), "drop_down", 0.70, 1.0, ("leaf",), 10.0),
    _Spec("Blueberry", (45, 65, 150), "circle", 0.30),
    _Spec("Kiwi", (135, 105, 55), "ellipse", 0.72, 0.80, (), 9.0),
    _Spec("Avocado", (45, 85, 30), "drop_up", 0.80, 1.0, (), 6.0),
    _Spec("Eggplant", (65, 20, 75), "ellipse", 0.90, 0.45, ("leaf",)),
    _Spec("Plum", (120, 40, 100), "circle", 0.58),
    _Spec("Peach", (250, 175, 125), "circle", 0.76, 0.95, (), 6.0),
    _Spec("Pear", (190, 200, 80), "pear", 0.86, 1.0, ("stem",)),
    _Spec("Carambola", (215, 235, 40), "star", 0.85),
    _Spec("Pepper Orange", (255, 95, 0), "rounded_rect", 0.78, 1.1, ("stem",)),
    _Spec("Coconut", (95, 60, 35), "circle", 0.80, 1.0, (), 14.0),
    _Spec("Raspberry", (200, 25, 110), "grapes", 0.52, 1.0, (), 8.0),
    _Spec("Watermelon", (30, 110, 60), "circle", 0.88, 0.9, (), 8.0),
    _Spec("Corn", (240, 200, 100), "rounded_rect", 0.92, 0.40, ("leaf",)),
)


def _spec(index: int) -> _Spec:
    """Spec of label ``index``: curated first, then "<base> <k>" variants with shifted colour/size."""
    base = _CURATED[index % len(_CURATED)]
    k = index // len(_CURATED)
    if k == 0:
        return base
    rng = np.random.default_rng([0xF2, index])  # label look must not depend on the image seed
    rgb = tuple(int(c) for c in np.clip(np.array(base.rgb) + rng.integers(-45, 46, 3), 0, 235))
    size = float(np.clip(base.size * rng.uniform(0.8, 1.1), 0.25, 0.95))
    return replace(base, name=f"{base.name} {k + 1}", rgb=rgb, size=size)


def demo_labels(n: int) -> list[str]:
    """The first ``n`` label names (folder names), unique for any ``n``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [_spec(i).name for i in range(n)]


# --- shapes: each draws a filled mask centred on (cx, cy) with radius r, in supersampled pixels ---


def _ellipse(d: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: int = 255) -> None:
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def _drop(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, point_up: bool) -> None:
    # Teardrop curve x = sin t * sin(t/2), y = cos t: rounded at one end, pointed at the other.
    sign = -1 if point_up else 1
    pts = [
        (cx + 0.9 * r * math.sin(t) * math.sin(t / 2), cy + sign * r * math.cos(t))
        for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)
    ]
    d.polygon(pts, fill=255)


def _draw_body(d: ImageDraw.ImageDraw, spec: _Spec, cx: float, cy: float, r: float) -> None:
    shape, a = spec.shape, spec.aspect
    if shape in ("circle", "ellipse"):
        _ellipse(d, cx, cy, r, r * a)
    elif shape == "rounded_rect":
        w, h = r * 0.8, r * 0.8 * a
        if h > r:  # keep tall shapes inside the radius
            w, h = w * r / h, r
        d.rounded_rectangle((cx - w, cy - h, cx + w, cy + h), radius=min(w, h) * 0.6, fill=255)
    elif shape == "crescent":
        # A disc minus a shifted disc leaves a banana-like crescent.
        _ellipse(d, cx, cy, r, r * 0.9)
        _ellipse(d, cx + 0.25 * r, cy - 0.35 * r, r * 0.95, r * 0.85, fill=0)
    elif shape == "grapes":
        # Rows of small berries narrowing downwards, like a bunch.
        br = r / 4.4  # five rows of 1.7 * br span exactly 2r
        for row, count in enumerate((4, 3, 3, 2, 1)):
            y = cy - r + br + row * 1.7 * br
            for i in range(count):
                _ellipse(d, cx + (i - (count - 1) / 2) * 1.9 * br, y, br, br)
    elif shape in ("drop_up", "drop_down"):
        _drop(d, cx, cy, r, point_up=shape == "drop_up")
    elif shape == "pear":
        _ellipse(d, cx, cy + 0.35 * r, 0.62 * r, 0.62 * r)
        _ellipse(d, cx, cy - 0.35 * r, 0.38 * r, 0.45 * r)
        d.polygon([(cx - 0.36 * r, cy - 0.3 * r), (cx + 0.36 * r, cy - 0.3 * r),
                   (cx + 0.6 * r, cy + 0.3 * r), (cx - 0.6 * r, cy + 0.3 * r)], fill=255)
    elif shape == "star":
        pts = []
        for i in range(10):  # five-pointed star fruit seen end-on
            rad = r if i % 2 == 0 else r * 0.5
            t = math.pi * i / 5 - math.pi / 2
            pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
        d.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _top(spec: _Spec, cy: float, r: float) -> float:
    """y of the top of the body, where stems and leaves attach."""
    if spec.shape in ("circle", "ellipse"):
        return cy - r * spec.aspect
    if spec.shape == "rounded_rect":
        return cy - min(r, r * 0.8 * spec.aspect)
    if spec.shape == "pear":
        return cy - 0.8 * r
    return cy - r


# --- rendering ---

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)


def _render(spec: _Spec, rng: np.random.Generator) -> Image.Image:
    big = SIZE * _SS
    r = spec.size * (big / 2) * rng.uniform(0.94, 1.04)
    cx = big / 2 + rng.uniform(-4, 4) * _SS
    cy = big / 2 + rng.uniform(-4, 4) * _SS
    angle = rng.uniform(-30, 30)  # Fruits-360 files are views of a rotating fruit
    body, extras = _masks(spec, big, cx, cy, r)

    # Light from the upper left: brighter highlight, darker far side, so the fruit looks round.
    hx, hy, rr = (cx - 0.4 * r) / _SS, (cy - 0.4 * r) / _SS, r / _SS
    dist = np.sqrt((_XX - hx) ** 2 + (_YY - hy) ** 2) / rr
    shade = np.clip(1.15 - 0.35 * dist, 0.55, 1.15)[..., None]
    rgb = np.array(spec.rgb, np.float32) + rng.uniform(-6, 6, 3).astype(np.float32)
    noise = rng.standard_normal((SIZE, SIZE, 1), dtype=np.float32) * spec.texture

    out = np.full((SIZE, SIZE, 3), 255.0, np.float32)  # white background, like Fruits-360
    for mask, colour in [(body, rgb * shade + noise), *extras]:
        # Rotate the whole drawing around the fruit centre, then reduce 2x: anti-aliased coverage.
        rotated = mask.rotate(angle, resample=Image.Resampling.BILINEAR, center=(cx, cy)).reduce(_SS)
        a = np.asarray(rotated, dtype=np.float32)[..., None] / 255
        out = out * (1 - a) + np.asarray(colour, np.float32) * a
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB")


def _masks(spec: _Spec, big: int, cx: float, cy: float, r: float) -> tuple[Image.Image, list[tuple[Image.Image, tuple]]]:
    """The fruit's shapes at `big` pixels, upright: the body, and the extras with their flat colours
    (painted over the body in this order)."""

    def layer() -> tuple[Image.Image, ImageDraw.ImageDraw]:
        img = Image.new("L", (big, big), 0)
        return img, ImageDraw.Draw(img)

    body, d = layer()
    _draw_body(d, spec, cx, cy, r)
    top = _top(spec, cy, r)
    extras = []
    if "leaf" in spec.extras:
        leaf, d = layer()
        _ellipse(d, cx + 0.18 * r, top - 0.08 * r, 0.2 * r, 0.09 * r)
        extras.append((leaf, _LEAF))
    if "stem" in spec.extras:
        stem, d = layer()
        d.line((cx, top + 0.1 * r, cx + 0.08 * r, top - 0.25 * r), fill=255, width=max(2, int(r * 0.07)))
        extras.append((stem, _STEM))
    return body, extras


def _image_rng(seed: int, label_index: int, image_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, label_index, image_index])


def generate_demo_set(
    root: str | os.PathLike,
    labels: int = DEFAULT_LABELS,
    images_per_label: int = DEFAULT_IMAGES_PER_LABEL,
    seed: int = 0,
) -> list[pathlib.Path]:
    """Write ``labels`` x ``images_per_label`` JPEGs under ``root``; return their paths.

    Existing files with the same names are overwritten (with identical bytes for the same
    arguments); nothing else under ``root`` is touched.
    """
    if labels < 0 or images_per_label < 0:
        raise ValueError("labels and images_per_label must be >= 0")
    if seed < 0:
        raise ValueError("seed must be >= 0")  # numpy seed sequences reject negative entropy
    root = pathlib.Path(root)
    paths = []
    for li in range(labels):
        spec = _spec(li)
        folder = root / spec.name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(images_per_label):
            img = _render(spec, _image_rng(seed, li, n))
            buf = io.BytesIO()
            # Fixed encoder settings: the same pixels always give the same bytes.
            img.save(buf, format="JPEG", quality=_JPEG_QUALITY, subsampling=0, optimize=False)
            path = folder / f"r0_{n}.jpg"
            path.write_bytes(buf.getvalue())
            paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fruit_assets_dev.demo_data",
        description="Write a deterministic demo image set in the Fruits-360 layout.",
    )
    parser.add_argument("--out", required=True, help="root folder; one subfolder per label")
    parser.add_argument("--labels", type=int, default=DEFAULT_LABELS)
    parser.add_argument("--images-per-label", type=int, default=DEFAULT_IMAGES_PER_LABEL)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        paths = generate_demo_set(args.out, args.labels, args.images_per_label, args.seed)
    except ValueError as e:  # bad counts/seed: a usage error, not a traceback
        parser.error(str(e))
    print(f"wrote {len(paths)} images ({args.labels} labels x {args.images_per_label}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
