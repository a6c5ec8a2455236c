"""Small PNG plots for the Dagster UI: PCA explained variance, a 2-D PCA scatter, an image contact sheet.

Pure functions that return PNG bytes (about 600x400 px), plus the two ways to publish them:
`markdown_image` (embed in asset metadata as `MetadataValue.md`, which the Dagster UI renders) and
`save_png` (store the file next to the assets).

How the Dagster 1.13 UI shows `MetadataValue.md(markdown_image(png, alt))` (checked in the real UI):
the markdown is rendered by react-markdown with rehype-sanitize, whose schema Dagster extends to allow
`data:` URLs in `src`, so `![alt](data:image/png;base64,...)` becomes an <img>. Raw HTML (`<img ...>`)
is stripped by the sanitizer, and `javascript:` links are neutralised. Markdown of 1000 characters or
more (any real plot) is not inlined in the metadata tables: the value shows as "[Show Markdown]", which
opens a dialog with the rendered image. No size limit was hit up to a 1 MB PNG.

Matplotlib is used through its Agg canvas directly (`Figure` + `FigureCanvasAgg`): no pyplot, so no
global figure state or GUI backend, and the functions are safe to call from any thread. The contact
sheet uses Pillow only. This module does not import Dagster, and imports Matplotlib only when it draws: a
process that loads the definitions and never plots (a CLI run that fails early, `dagster dev`'s code server,
a cluster step of image_features) does not pay for it: 0.3 s of the definitions' 1.4 s of imports, more where
the bytecode is not compiled yet.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH_IN, HEIGHT_IN, DPI = 6.0, 4.0, 100  # 600 x 400 px

# Contact sheet layout, in pixels.
SHEET_PAD = 4
SHEET_LABEL_WIDTH = 150
SHEET_BACKGROUND = (255, 255, 255)
SHEET_PLACEHOLDER = (170, 170, 170)

# Labels beyond this many get no legend: a legend of 150 entries cannot be read at 600x400.
MAX_LEGEND_LABELS = 48
_MARKERS = ("o", "s", "^", "D", "v", "P")


def _png(fig: Figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buffer = io.BytesIO()
    FigureCanvasAgg(fig)
    # No bbox_inches="tight": it would change the pixel size. Layout is set per figure instead.
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _figure() -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)


def explained_variance_plot(explained_variance: np.ndarray, k: int, variance_target: float | None) -> bytes:
    """Per-component explained variance (bars) and its cumulative curve, with k and the target marked.

    `explained_variance`: fraction of the total variance per component, in component order (as Spark
    ML's `PCAModel.explainedVariance`); it may be longer than `k`."""
    variance = np.asarray(explained_variance, dtype=float).ravel()
    if variance.size == 0:
        raise ValueError("explained_variance is empty")
    if not np.all(np.isfinite(variance)):
        raise ValueError("explained_variance contains NaN or infinite values")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    cumulative = np.cumsum(variance)
    components = np.arange(1, variance.size + 1)
    kept = float(cumulative[min(k, variance.size) - 1])

    fig = _figure()
    ax = fig.add_axes((0.12, 0.13, 0.84, 0.75))
    ax.bar(components, variance, width=0.8 if variance.size < 60 else 1.0, color="#9ecae1",
           label="per component")
    ax.plot(components, cumulative, color="#08519c", marker="o" if variance.size <= 30 else None,
            markersize=3, linewidth=1.8, label="cumulative")
    ax.axvline(k, color="#d62728", linestyle="--", linewidth=1.2, label=f"k = {k}")
    if variance_target is not None:
        ax.axhline(variance_target, color="#2ca02c", linestyle=":", linewidth=1.4,
                   label=f"target {variance_target:.0%}")
    ax.set_xlim(0.4, max(variance.size, k) + 0.6)
    top = max(1.0, float(cumulative.max()), variance_target or 0.0)
    ax.set_ylim(0, top * 1.05)
    ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    if variance.size <= 12 and k <= 12:
        ax.set_xticks(np.arange(1, max(variance.size, k) + 1))
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="center right", fontsize=8, framealpha=0.9)
    target = "" if variance_target is None else f" (target {variance_target:.0%})"
    ax.set_title(f"PCA explained variance: k={k} keeps {kept:.1%}{target}", fontsize=11)
    return _png(fig)


def label_colors(count: int) -> list[tuple[float, float, float, float]]:
    """`count` distinct colours: tab10 / tab20 / tab20+b+c qualitative palettes, then a turbo sweep."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    if count <= 60:
        palette = [colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
        return palette[:count]
    turbo = colormaps["turbo"]
    return [turbo(value) for value in np.linspace(0.03, 0.97, count)]


def pca_scatter_plot(points_2d: np.ndarray, labels: Sequence[str]) -> bytes:
    """Scatter of the first two PCA components, a colour (and marker) per label.

    Up to MAX_LEGEND_LABELS labels get a legend outside the axes on the right; beyond that the legend
    is left out (the title says how many labels there are). A single-component input (k=1) is drawn
    along the x axis."""
    x, y, one_component = _coordinates(points_2d, len(labels))
    labels = [str(label) for label in labels]
    names = sorted(set(labels))
    with_legend = 0 < len(names) <= MAX_LEGEND_LABELS
    columns = 1 if len(names) <= 24 else 2
    fig = _figure()
    right = 1.0 - (0.0 if not with_legend else 0.24 if columns == 1 else 0.40)
    ax = fig.add_axes((0.1, 0.12, right - 0.13, 0.78))
    label_array = np.asarray(labels, dtype=object)
    for index, (name, color) in enumerate(zip(names, label_colors(len(names)), strict=True)):
        mask = label_array == name
        ax.scatter(x[mask], y[mask], s=18, color=color, marker=_MARKERS[index % len(_MARKERS)],
                   edgecolors="none", alpha=0.85, label=name)
    if not len(names):
        ax.text(0.5, 0.5, "no points", transform=ax.transAxes, ha="center", va="center", color="grey")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("(only one component)" if one_component else "PC 2")
    if one_component:
        ax.set_yticks([])
    ax.grid(alpha=0.3)
    ax.set_title(f"PCA projection: {len(labels)} images, {len(names)} labels", fontsize=11)
    if with_legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=6 if len(names) > 12 else 7,
                  ncols=columns, frameon=False, handletextpad=0.2, columnspacing=0.6, borderaxespad=0.0,
                  labelspacing=0.25 if len(names) > 12 else 0.5)
    elif names:
        ax.text(1.0, -0.1, f"{len(names)} labels: no legend", transform=ax.transAxes, ha="right",
                va="top", fontsize=7, color="grey")
    return _png(fig)


def _coordinates(points_2d: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """x and y of `count` points given as (n, 2) or (n, 1) (then y is 0), and whether there was only
    one component."""
    points = np.asarray(points_2d, dtype=float)
    if points.ndim == 1:
        points = points[:, None]
    if points.ndim != 2 or points.shape[1] < 1:
        raise ValueError(f"points_2d must have shape (n, 2) or (n, 1), got {np.shape(points_2d)}")
    if count != points.shape[0]:
        raise ValueError(f"{points.shape[0]} points but {count} labels")
    one_component = points.shape[1] == 1
    x = points[:, 0]
    return x, (np.zeros_like(x) if one_component else points[:, 1]), one_component


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _thumbnail(data: bytes, thumb: int) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (thumb, thumb))  # JPEG: decode at a reduced scale, much faster
            image = image.convert("RGB")
            image.thumbnail((thumb, thumb), Image.Resampling.BILINEAR)
            return image
    except Exception:  # anything undecodable (truncated, not an image, decompression bomb...)
        return None


def contact_sheet_size(labels: int, per_label: int = 3, thumb: int = 64) -> tuple[int, int]:
    """Pixel size (width, height) of a contact sheet with `labels` rows."""
    width = SHEET_PAD + SHEET_LABEL_WIDTH + per_label * (thumb + SHEET_PAD)
    height = SHEET_PAD + max(labels, 1) * (thumb + SHEET_PAD)
    return width, height


def contact_sheet(images: list[tuple[str, bytes]], per_label: int = 3, thumb: int = 64) -> bytes:
    """A grid of thumbnails: one row per label (sorted), its name at the left, then up to `per_label`
    of its images in the order given. Images that cannot be decoded show as a grey placeholder."""
    if per_label < 1 or thumb < 8:
        raise ValueError(f"per_label must be >= 1 and thumb >= 8, got {per_label} and {thumb}")
    by_label: dict[str, list[bytes]] = {}
    for label, data in images:
        samples = by_label.setdefault(str(label), [])
        if len(samples) < per_label:
            samples.append(data)
    labels = sorted(by_label)
    sheet = Image.new("RGB", contact_sheet_size(len(labels), per_label, thumb), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    if not labels:
        draw.text((SHEET_PAD, SHEET_PAD), "no images", fill=(120, 120, 120), font=font)
    for row, label in enumerate(labels):
        top = SHEET_PAD + row * (thumb + SHEET_PAD)
        text = _fit_text(draw, label, font, SHEET_LABEL_WIDTH - SHEET_PAD)
        draw.text((SHEET_PAD, top + thumb // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        for column, data in enumerate(by_label[label]):
            left = SHEET_PAD + SHEET_LABEL_WIDTH + column * (thumb + SHEET_PAD)
            image = _thumbnail(data, thumb)
            if image is None:
                draw.rectangle((left, top, left + thumb - 1, top + thumb - 1), fill=SHEET_PLACEHOLDER)
                draw.line((left, top, left + thumb - 1, top + thumb - 1), fill=(140, 140, 140))
                draw.line((left, top + thumb - 1, left + thumb - 1, top), fill=(140, 140, 140))
                continue
            sheet.paste(image, (left + (thumb - image.width) // 2, top + (thumb - image.height) // 2))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown that shows `png` in the Dagster UI: use it as `MetadataValue.md(markdown_image(png, alt))`.

    A base64 `data:` URL in markdown image syntax; the UI renders it as `<img alt=alt>` (see the
    module docstring for where and how). `alt` may not contain brackets or newlines."""
    if not png.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError("not PNG data")
    if any(char in alt for char in "[]\n\r\\"):
        raise ValueError(f"alt text {alt!r} must not contain brackets, backslashes or newlines")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"


def png_from_markdown(markdown: str) -> bytes:
    """The PNG bytes embedded by `markdown_image` (the inverse, for tests and tools)."""
    prefix = "(data:image/png;base64,"
    start = markdown.index(prefix) + len(prefix)
    end = markdown.index(")", start)
    return base64.b64decode(markdown[start:end], validate=True)
