"""A folder of the awkward files real buckets hold, in the Fruits-360 layout, for tests.

`write_hostile_tree(root)` returns {relative path: None (must be featurized) or a fragment of the
reason it must be skipped}.
"""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, **params)
    return out.getvalue()


def _png(image: Image.Image, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", **params)
    return out.getvalue()


def fruit(size=(100, 100), colour=(220, 40, 30)) -> Image.Image:
    """A red disc on white, with a green stem: asymmetric, so rotations are visible."""
    image = Image.new("RGB", size, "white")
    array = np.array(image)
    h, w = array.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    array[(yy - h * 0.55) ** 2 + (xx - w / 2) ** 2 < (min(h, w) * 0.35) ** 2] = colour
    array[int(h * 0.1):int(h * 0.25), int(w * 0.48):int(w * 0.55)] = (30, 140, 40)
    return Image.fromarray(array)


def exif_rotated_jpeg() -> bytes:
    """Stored sideways with EXIF orientation 6 (display rotated 90 degrees clockwise), as phones do."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _jpeg(fruit().transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())


def decompression_bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny PNG whose header declares a huge image (10 gigapixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def animated_png() -> bytes:
    frames = [fruit(colour=(220, 40, 30)), fruit(colour=(30, 40, 220))]
    return _png(frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)


def write_hostile_tree(root) -> dict[str, str | None]:
    root = Path(root)
    png16 = Image.fromarray(np.full((80, 80), 40_000, dtype=np.uint16))
    good_jpeg = _jpeg(fruit())
    files: dict[str, tuple[bytes, str | None]] = {
        "Apple Red/r0_0.jpg": (good_jpeg, None),
        "Apple Red/r0 with spaces.jpg": (good_jpeg, None),
        "Apple Red/100%+plus#hash.JPG": (good_jpeg, None),
        "Äpfel Grün/ünïcödé 林檎.jpeg": (good_jpeg, None),
        "Modes/grayscale.jpg": (_jpeg(fruit().convert("L")), None),
        "Modes/cmyk.jpg": (_jpeg(fruit().convert("CMYK")), None),
        "Modes/rgba.png": (_png(fruit().convert("RGBA")), None),
        "Modes/palette.png": (_png(fruit().convert("P")), None),
        "Modes/sixteen_bit.png": (_png(png16), None),
        "Modes/exif_rotated.jpg": (exif_rotated_jpeg(), None),
        "Modes/large 4000x3000.jpg": (_jpeg(fruit(size=(4000, 3000))), None),
        "Modes/animated.png": (animated_png(), None),
        "Broken/truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "truncated"),
        "Broken/empty.jpg": (b"", "empty"),
        "Broken/page.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", "cannot identify"),
        "Broken/bomb.png": (decompression_bomb_png(), "decompression-bomb guard"),
    }
    for relative, (data, _) in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "Broken" / "notes.txt").write_text("not an image: ignored by the catalog")
    (root / "Empty Folder").mkdir(exist_ok=True)
    return {relative: reason for relative, (_, reason) in files.items()}
