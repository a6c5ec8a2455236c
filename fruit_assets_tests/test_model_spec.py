"""One model spec: a second, small spec swapped in runs the whole graph, and nothing computed by one spec
is reused for another.

The small spec is two convolutions on 32 x 32 images that take 0-255 pixels and rescale them inside the
model, as Keras' EfficientNet does, with 16 features. Its reference is plain Keras on Pillow's resize,
independent of the project's decoding and runtime.
"""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fruit_assets.ml.featurize import PreparedModel, prepare_feature_extractor
from fruit_assets.ml.model import weights_fingerprint
from fruit_assets.ml.onnx_model import cache_path
from fruit_assets.ml.spec import DEFAULT_SPEC, ModelInput, ModelSpec, pixel_values, register, scale_to_unit_range, spec_named
from fruit_assets.resources import FeatureModel
from fruit_assets_tests.support import local_resources, materialize_all, metadata_of, read_asset

SIZE, FEATURES = 32, 16


def tiny_cnn(weights: str | None):
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)  # 0-255 in, like EfficientNet
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(FEATURES, 3, strides=2, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="tiny_cnn")
    if weights is not None:
        model.load_weights(weights)
    return model


TINY = register(ModelSpec("tiny_cnn", tiny_cnn, ModelInput(SIZE, pixel_values), FEATURES, "two convolutions, for tests"))
# The same model and weights, preprocessed otherwise: other features, so nothing may be reused between them.
TINY_UNIT_RANGE = register(
    ModelSpec("tiny_cnn_unit_range", tiny_cnn, ModelInput(SIZE, scale_to_unit_range), FEATURES, "the same, fed [-1, 1]")
)


class SpecFeatureModel(FeatureModel):
    """The feature_model resource with another spec than the default."""

    spec_name: str

    def feature_extractor(self) -> PreparedModel:
        return prepare_feature_extractor(self.weights_source(), self.featurize_settings(), spec_named(self.spec_name))


def test_the_fingerprint_and_the_onnx_cache_name_tell_specs_apart():
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, dtype=np.float32)]
    assert weights_fingerprint(weights, TINY) == weights_fingerprint([w.copy() for w in weights], TINY)
    assert weights_fingerprint(weights, TINY) != weights_fingerprint(weights, TINY_UNIT_RANGE)
    assert weights_fingerprint(weights, TINY) != weights_fingerprint(weights)  # the default spec's
    assert cache_path("f", spec=TINY).name.startswith("tiny_cnn_features_f_")
    assert cache_path("f").name.startswith(f"{DEFAULT_SPEC.name}_features_f_")


def test_specs_are_found_by_name_and_a_name_stands_for_one_spec():
    assert spec_named("tiny_cnn") is TINY and register(TINY) is TINY
    with pytest.raises(ValueError, match="another model spec is registered as 'tiny_cnn'"):
        register(ModelSpec("tiny_cnn", tiny_cnn, ModelInput(SIZE, pixel_values), 8, "another"))
    with pytest.raises(ValueError, match="no model spec named 'nope'; known: .*mobilenet_v2"):
        spec_named("nope")
    with pytest.raises(ValueError, match="lowercase"):
        ModelSpec("Tiny CNN", tiny_cnn, ModelInput(SIZE, pixel_values), 8, "names files")
    # A model staged for Databricks comes back with its metadata only: the spec is found by its name there.
    assert PreparedModel(b"", "f", {"model_spec": "tiny_cnn"}, 0.0, True).spec is TINY
    assert PreparedModel(b"", "f", {}, 0.0, True).spec is DEFAULT_SPEC  # staged before specs had names


def keras_reference(weights: Path, paths: list[str]) -> np.ndarray:
    def pixels(path: str) -> np.ndarray:
        image = Image.open(io.BytesIO(Path(path).read_bytes())).convert("RGB")
        return np.asarray(image.resize((SIZE, SIZE), Image.Resampling.BILINEAR))

    return np.asarray(tiny_cnn(str(weights))(np.stack([pixels(p) for p in paths]).astype(np.float32), training=False))


def run(images, storage, weights: Path, spec: ModelSpec, selection=None):
    resources = local_resources(images, storage, weights=str(weights))
    resources["feature_model"] = SpecFeatureModel(weights=str(weights), spec_name=spec.name)
    # k: null, from the variance target: the default k=50 is more than 16 features have.
    return materialize_all(resources, selection=selection, run_config={"ops": {"pca_model": {"config": {"k": None}}}})


@pytest.mark.slow  # builds a (small) Keras model and converts it to ONNX
def test_a_second_spec_runs_end_to_end_and_shares_nothing_with_another(spark, demo_images, tmp_path):
    weights = tmp_path / "tiny_cnn.weights.h5"
    model, rs = tiny_cnn(None), np.random.RandomState(0)
    model.set_weights([rs.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save_weights(weights)
    storage = tmp_path / "assets"

    result = run(demo_images, storage, weights, TINY)
    features = read_asset(storage, "image_features").sort_values("path", ignore_index=True)
    vectors = np.stack(features.features)
    assert vectors.shape == (72, FEATURES)
    assert np.abs(vectors - keras_reference(weights, list(features.path))).max() < 1e-4
    assert np.abs(vectors[0] - vectors[-1]).max() > 1e-3  # the images differ, so do their vectors
    metadata = metadata_of(result, "image_features")
    assert (metadata["model_spec"], metadata["feature_dim"], metadata["input_size"]) == ("tiny_cnn", FEATURES, SIZE)
    assert metadata["featurized_on"] == "spark"  # 72 images: the workers got the spec's size and preprocessing
    assert Path(metadata["onnx_model_file"]).name.startswith("tiny_cnn_features_")
    assert all(check.passed for check in result.get_asset_check_evaluations())
    pca = metadata_of(result, "pca_model")
    assert 1 <= pca["k"] <= FEATURES
    assert set(read_asset(storage, "reduced_features").pca_features.map(len)) == {pca["k"]}

    # The same weights under the other spec: every image featurized again, the PCA summed afresh.
    again = run(demo_images, storage, weights, TINY_UNIT_RANGE, selection=["raw_images", "image_features", "pca_model"])
    metadata_again = metadata_of(again, "image_features")
    assert (metadata_again["featurized"], metadata_again["reused"]) == (72, 0)
    assert metadata_again["weights_fingerprint"] != metadata["weights_fingerprint"]
    assert Path(metadata_again["onnx_model_file"]).name.startswith("tiny_cnn_unit_range_features_")
    pca_again = metadata_of(again, "pca_model")
    assert pca_again["statistics_mode"] == "full" and "another model spec" in pca_again["statistics_reason"]
    refeaturized = read_asset(storage, "image_features").sort_values("path", ignore_index=True)
    assert np.abs(np.stack(refeaturized.features) - vectors).max() > 1e-3
