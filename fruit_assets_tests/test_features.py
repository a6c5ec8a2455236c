"""image_features computed in Spark equal plain single-process Keras, with every runtime.

The reference path is deliberately independent of the project's model code: keras.applications'
own MobileNetV2 loading the same .h5 file, Pillow, Keras' own preprocess_input, and
model(x, training=False).
"""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fruit_assets_tests.support import local_resources, materialize_all, metadata_of, read_asset
from fruit_assets_tests.weights_files import save_legacy_h5


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from fruit_assets.ml.model import build_feature_extractor, parse_weights_setting

    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_no_top.h5"
    # A seed other tests use too: each seed's weights cost a fresh TensorFlow process once per run.
    save_legacy_h5(build_feature_extractor(parse_weights_setting("random:1")), path)
    return path


@pytest.fixture(scope="module")
def handful(demo_images, tmp_path_factory):
    """Six demo images of three labels, plus one file that only pretends to be a JPEG."""
    root = tmp_path_factory.mktemp("handful")
    for label in sorted(p.name for p in demo_images.iterdir())[:3]:
        shutil.copytree(demo_images / label, root / label, ignore=shutil.ignore_patterns("r0_2.jpg"))
    (root / "Lemon").mkdir(exist_ok=True)
    (root / "Lemon" / "broken.jpg").write_text("<html>this is not an image</html>")
    return root


def keras_reference(weights_file, paths):
    import keras

    model = keras.applications.MobileNetV2(include_top=False, pooling="avg", input_shape=(224, 224, 3), weights=str(weights_file))
    batch = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(Path(p).read_bytes())).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))
            for p in paths
        ]
    ).astype(np.float32)
    return np.asarray(model(keras.applications.mobilenet_v2.preprocess_input(batch), training=False))


@pytest.mark.parametrize("runtime", ["onnxruntime", "tensorflow"])
def test_spark_features_equal_single_process_keras(spark, handful, weights_file, tmp_path, runtime):
    from fruit_assets.resources import FeatureModel

    resources = local_resources(handful, tmp_path, weights=str(weights_file))
    # 1 broken file in 7 is over the default max_skipped_fraction (0.1): allow it here.
    resources["feature_model"] = FeatureModel(weights=str(weights_file), runtime=runtime, max_skipped_fraction=0.5)
    result = materialize_all(resources, selection=["raw_images", "image_features"])
    features = read_asset(tmp_path, "image_features").sort_values("path", ignore_index=True)
    assert len(features) == 6
    expected = keras_reference(weights_file, list(features.path))
    actual = np.stack(features.features)
    assert actual.shape == (6, 1280)
    assert np.abs(actual - expected).max() < 1e-4
    # Different images give different vectors: this is not a collapsed model.
    assert np.abs(actual[0] - actual[3]).max() > 1e-2

    metadata = metadata_of(result, "image_features")
    assert metadata["runtime"] == runtime
    assert metadata["weights_source"] == f"file:{weights_file}"
    assert metadata["weights_meaningful"] is True
    # The pretend JPEG is skipped with its path and reason; the check accounts for it.
    assert metadata["skipped"] == 1
    [skipped] = metadata["skipped_images"].records
    assert skipped.data["path"].endswith("Lemon/broken.jpg")
    assert "could not be decoded" in skipped.data["error"] or "cannot identify" in skipped.data["error"]
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"one_row_per_image": True, "vectors_are_finite_floats_of_the_model_dimension": True}


def test_unavailable_imagenet_weights_fail_at_once_with_instructions(spark, handful, tmp_path):
    from pathlib import Path

    from fruit_assets.ml.model import IMAGENET_NO_TOP_WEIGHTS_FILE

    if (Path.home() / ".keras" / "models" / IMAGENET_NO_TOP_WEIGHTS_FILE).exists():
        pytest.skip("ImageNet weights are cached on this machine, so imagenet would load")
    result = materialize_all(
        local_resources(handful, tmp_path, weights="imagenet"),
        selection=["raw_images", "image_features"],
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.error
    text = error.message + (error.cause.message if error.cause else "")
    assert "FRUIT_MODEL_WEIGHTS" in text and "random" in text and IMAGENET_NO_TOP_WEIGHTS_FILE in text
    assert not (tmp_path / "image_features").exists()
