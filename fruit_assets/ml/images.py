"""Image decoding, in Pillow + numpy only (the model's preprocessing is its spec's, `spec.py`).

This module runs inside Spark Python workers for every image, so it deliberately does not import
tensorflow/keras: importing it must stay cheap.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from fruit_assets.ml.spec import DEFAULT_SPEC

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def is_image_path(path: str) -> bool:
    """True if `path` names an image we featurize (extension matched case-insensitively)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


# Decompression-bomb guard: a small file can declare huge dimensions. 64 megapixels (e.g. 8000 x 8000,
# bigger than any phone photo) decode to at most ~200 MB of RGB; anything larger is refused from its
# header alone, before a single pixel is decoded.
DEFAULT_MAX_PIXELS = 64_000_000


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, size: int = DEFAULT_SPEC.inputs.size) -> np.ndarray:
    """Decode encoded image bytes into a (size, size, 3) uint8 RGB array, as a person sees the image
    (`size`: the model spec's input size).

    - EXIF orientation is applied (phone photos are stored rotated and shown upright).
    - Transparency is composited onto white, the background of Fruits-360 photos.
    - 16-bit images are scaled to 8 bits (not clipped).
    - Multi-frame files (animated PNG, ...) contribute their first frame.
    Raises ValueError, saying why, if the bytes are not a decodable image or exceed `max_pixels`.
    """
    if not data:
        raise ValueError("could not decode image: the file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ValueError(
                    f"image is {width} x {height} = {width * height:,} pixels, over the limit of "
                    f"{max_pixels:,} (decompression-bomb guard)"
                )
            image.seek(0)
            rgb = _to_rgb(ImageOps.exif_transpose(image))
            # BILINEAR is the project's choice of filter, stated explicitly so that it does not
            # depend on Pillow's default. Note it is not what keras.utils.load_img does (nearest
            # by default), and Pillow's BILINEAR widens its support when downscaling (antialiased)
            # while tf.image.resize's bilinear does not, so features differ slightly from those
            # pipelines. No Image.draft(): JPEG draft decoding is faster but changes pixels.
            resized = rgb.resize((size, size), resample=Image.Resampling.BILINEAR)
    except ValueError as exc:
        if str(exc).startswith("image is "):
            raise
        raise ValueError(f"could not decode image: {exc}") from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires in Image.open for sizes far over ours; same verdict.
        raise ValueError(f"could not decode image: {exc} (decompression-bomb guard)") from exc
    except Exception as exc:  # Pillow raises many types: UnidentifiedImageError, OSError, ...
        raise ValueError(f"could not decode image: {type(exc).__name__}: {exc}") from exc
    array = np.array(resized, dtype=np.uint8)  # a copy we own, not a view of Pillow's buffer
    assert array.shape == (size, size, 3), array.shape
    return array


def _to_rgb(image: Image.Image) -> Image.Image:
    """3-channel 8-bit RGB from any mode Pillow opens (L, LA, P, PA, RGBA, CMYK, I;16, I, F, ...)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit (and 32-bit) grayscale: Pillow's convert would clip at 255, i.e. saturate almost
        # every pixel. Scale by the type's range instead.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), mode="L")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")

