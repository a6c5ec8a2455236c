import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fruit_assets.ml.images import decode_image, is_image_path
from fruit_assets.ml.spec import MOBILENET_V2, pixel_values, scale_to_unit_range

IMAGE_SIZE = MOBILENET_V2.inputs.size  # decode_image's default: the default spec's


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_is_image_path():
    assert is_image_path("s3://bucket/Apple/r_1.jpg")
    assert is_image_path("a/B.JPEG")
    assert is_image_path("c.Png")
    assert not is_image_path("notes.txt")
    assert not is_image_path("image.jpg.txt")
    assert not is_image_path("jpg")


@pytest.mark.parametrize(
    "mode, color, fmt",
    [
        ("RGB", (200, 30, 10), "JPEG"),
        ("L", 128, "JPEG"),
        ("CMYK", (0, 255, 255, 0), "JPEG"),  # pure red in CMYK
        ("RGBA", (10, 200, 30, 128), "PNG"),
        ("P", None, "PNG"),
        ("LA", (90, 255), "PNG"),
    ],
)
def test_decode_modes(mode, color, fmt):
    if mode == "P":
        image = Image.new("RGB", (300, 200), (0, 0, 255)).convert("P")
    else:
        image = Image.new(mode, (300, 200), color)  # not square, not 224: exercises the resize
    decoded = decode_image(_encode(image, fmt))
    assert decoded.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert decoded.dtype == np.uint8
    if "A" in mode:
        # Transparency is composited onto white, the background of Fruits-360 photos.
        expected = np.array(
            Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA")).convert("RGB"), dtype=np.int16
        )[0, 0]
    else:
        expected = np.array(image.convert("RGB"), dtype=np.int16)[0, 0]
    # a uniform image stays uniform through the resize (JPEG may shift colours a little)
    assert np.abs(decoded.astype(np.int16) - expected).max() <= 3


def test_decode_keeps_structure():
    left_red_right_blue = np.zeros((100, 160, 3), np.uint8)
    left_red_right_blue[:, :80, 0] = 255
    left_red_right_blue[:, 80:, 2] = 255
    decoded = decode_image(_encode(Image.fromarray(left_red_right_blue), "PNG"))
    assert tuple(decoded[112, 10]) == (255, 0, 0)
    assert tuple(decoded[112, 213]) == (0, 0, 255)


@pytest.mark.parametrize("data", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_decode_garbage_raises_value_error(data):
    with pytest.raises(ValueError, match="could not decode image"):
        decode_image(data)


def test_decode_truncated_jpeg_raises_value_error():
    data = _encode(Image.new("RGB", (300, 300), (1, 2, 3)), "JPEG")
    with pytest.raises(ValueError, match="could not decode image"):
        decode_image(data[: len(data) // 2])


@pytest.mark.slow  # imports Keras
def test_preprocess_matches_keras():
    from keras.applications.mobilenet_v2 import preprocess_input

    batch = np.random.RandomState(0).randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    batch[0, 0, 0] = (0, 127, 255)
    ours = scale_to_unit_range(batch)
    assert ours.dtype == np.float32
    assert ours.shape == batch.shape
    np.testing.assert_array_equal(ours, preprocess_input(batch.astype(np.float32)))
    np.testing.assert_allclose(ours[0, 0, 0], [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
    assert batch[0, 0, 0, 2] == 255  # the input is not modified in place


@pytest.mark.parametrize("preprocess", [scale_to_unit_range, pixel_values])
def test_preprocess_rejects_float_input(preprocess):
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32))


def test_pixel_values_keep_the_pixels_as_floats():
    batch = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    ours = pixel_values(batch)
    assert ours.dtype == np.float32 and ours.tolist() == [[[[0.0, 128.0, 255.0]]]]


def test_images_are_decoded_to_the_size_asked_for():
    assert decode_image(_encode(Image.new("RGB", (100, 60), "red"), "PNG"), size=32).shape == (32, 32, 3)


def test_images_module_does_not_import_tensorflow():
    code = (
        "import sys, fruit_assets.ml.images, fruit_assets.ml.model; "
        "print(sorted(m for m in ('tensorflow', 'keras', 'dagster', 'pyspark') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- hostile files ---------------------------------------------------------------------------------

from fruit_assets_tests.hostile_files import (  # noqa: E402
    animated_png,
    decompression_bomb_png,
    exif_rotated_jpeg,
    fruit,
    write_hostile_tree,
)


def test_exif_orientation_is_applied():
    upright = decode_image(_encode(fruit(), "JPEG"))
    rotated = decode_image(exif_rotated_jpeg())
    # Shown upright, as a person sees it: the stem is at the top in both.
    assert np.abs(rotated.astype(int) - upright.astype(int)).mean() < 6
    assert rotated[30:50, 100:125, 1].mean() > rotated[30:50, 100:125, 0].mean()  # green stem on top


def test_sixteen_bit_images_are_scaled_not_clipped():
    image = Image.fromarray(np.full((40, 40), 40_000, dtype=np.uint16))
    decoded = decode_image(_encode(image, "PNG"))
    assert abs(int(decoded[0, 0, 0]) - round(40_000 / 257)) <= 1  # 155, not 255


def test_a_decompression_bomb_is_refused_from_its_header():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="10000000000 pixels.*decompression-bomb guard"):
        decode_image(decompression_bomb_png())
    # Sizes under Pillow's own limit but over ours are refused by our header check.
    with pytest.raises(ValueError, match="10000 x 10000 = 100,000,000 pixels, over the limit"):
        decode_image(decompression_bomb_png(10_000, 10_000))
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: no 30 GB decode


def test_multi_frame_files_give_their_first_frame():
    decoded = decode_image(animated_png())
    assert decoded[130, 112, 0] > 150 and decoded[130, 112, 2] < 100  # the red first frame, not the blue one


def test_every_hostile_file_decodes_or_says_why(tmp_path):
    expected = write_hostile_tree(tmp_path)
    for relative, reason in expected.items():
        data = (tmp_path / relative).read_bytes()
        if reason is None:
            assert decode_image(data).shape == (IMAGE_SIZE, IMAGE_SIZE, 3), relative
        else:
            with pytest.raises(ValueError, match=reason):
                decode_image(data)
