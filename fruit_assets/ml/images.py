"""Image decoding and MobileNetV2 preprocessing, in Pillow + numpy only.

This module runs inside Spark Python workers for every image, so it deliberately does not import
tensorflow/keras: importing it must stay cheap.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def is_image_path(path: str) -> bool:
    """True if `path` names an image we featurize (extension matched case-insensitively)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(data: bytes) -> np.ndarray:
    """Decode encoded image bytes into a (224, 224, 3) uint8 RGB array.

    Raises ValueError if Pillow cannot decode the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Photos come as grayscale, CMYK, RGBA and palette images too; the model needs 3-channel
            # RGB. Alpha is dropped, not composited on a background.
            rgb = image.convert("RGB")
            # BILINEAR is the project's choice of filter, stated explicitly so that it does not
            # depend on Pillow's default. Note it is not what keras.utils.load_img does (nearest
            # by default), and Pillow's BILINEAR widens its support when downscaling (antialiased)
            # while tf.image.resize's bilinear does not, so features differ slightly from those
            # pipelines. No Image.draft(): JPEG draft decoding is faster but changes pixels.
            resized = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), resample=Image.Resampling.BILINEAR)
    except Exception as exc:  # Pillow raises many types: UnidentifiedImageError, OSError, ...
        raise ValueError(f"could not decode image: {type(exc).__name__}: {exc}") from exc
    array = np.array(resized, dtype=np.uint8)  # a copy we own, not a view of Pillow's buffer
    assert array.shape == (IMAGE_SIZE, IMAGE_SIZE, 3), array.shape
    return array


def preprocess(batch: np.ndarray) -> np.ndarray:
    """MobileNetV2 preprocessing of a uint8 (n, 224, 224, 3) batch: float32 in [-1, 1].

    Same as keras.applications.mobilenet_v2.preprocess_input ("tf" mode: x / 127.5 - 1, no RGB->BGR
    swap, which only caffe-mode models need), done in numpy so workers need no keras for it.
    """
    batch = np.asarray(batch)
    # Insisting on uint8 catches preprocessing an already preprocessed (float) batch twice.
    if batch.dtype != np.uint8:
        raise ValueError(f"preprocess expects a uint8 batch, got dtype {batch.dtype}")
    out = batch.astype(np.float32)
    out /= np.float32(127.5)
    out -= np.float32(1.0)
    return out
