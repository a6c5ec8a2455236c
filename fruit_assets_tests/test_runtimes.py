"""The inference runtimes: the default (ONNX Runtime) against plain Keras, its conversion cache, the
proof that the Spark Python workers never import TensorFlow with it, and clear errors.

Everything real: local Spark, TensorFlow and Keras on the driver, tf2onnx, ONNX Runtime, Dagster runs.
"""

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from fruit_assets_tests.support import failure_text, local_resources, materialize_all, metadata_of, new_python_workers, read_asset

pytestmark = pytest.mark.slow  # builds TensorFlow models or converts them

FEATURIZE = ["raw_images", "image_features"]
GUARD = Path(__file__).resolve().parent / "worker_guard"
TENSORFLOW_MODULES = {"tensorflow", "keras", "tf_keras", "tf2onnx"}


def keras_features(weights: str, paths: list[str]) -> np.ndarray:
    """Plain Keras, model(x, training=False), on the project's decoding of the same files."""
    from fruit_assets.ml.images import decode_image
    from fruit_assets.ml.model import build_feature_extractor, parse_weights_setting
    from fruit_assets.ml.spec import scale_to_unit_range as preprocess
    from fruit_assets.storage import read_bytes

    model = build_feature_extractor(parse_weights_setting(weights))
    images = preprocess(np.stack([decode_image(read_bytes(path)) for path in paths]))
    return np.concatenate([np.asarray(model(images[i : i + 16], training=False)) for i in range(0, len(images), 16)])


@contextmanager
def guarded_workers(spark, import_log: Path):
    """Spark Python functions created inside this block run in a new set of Python workers, started with
    worker_guard/ first on their PYTHONPATH: in them, any import of TensorFlow or Keras fails and is
    written to `import_log`."""
    with new_python_workers(spark, PYTHONPATH=str(GUARD), FRUIT_TEST_IMPORT_LOG=str(import_log)):
        yield


def probe_workers(spark, tasks: int = 2) -> list[dict]:
    """What the (reused) Python workers of the current worker set have imported. A pandas UDF job like
    the featurization's (SQL Python UDFs and RDD functions get different worker environments)."""
    watched = sorted(TENSORFLOW_MODULES)

    def probe(frames):
        import os as os_
        import sys as sys_

        import pandas as pd_

        for _ in frames:
            loaded = {name.split(".")[0] for name in list(sys_.modules)}
            yield pd_.DataFrame({
                "pid": [os_.getpid()],
                "tensorflow_like": [",".join(sorted(loaded & set(watched)))],
                "onnxruntime": ["onnxruntime" in loaded],
                "guarded": [any(type(finder).__name__ == "_Blocker" for finder in sys_.meta_path)],
            })

    schema = "pid long, tensorflow_like string, onnxruntime boolean, guarded boolean"
    frame = spark.range(0, tasks, 1, tasks).mapInPandas(probe, schema)
    return [row.asDict() for row in frame.collect()]


def test_default_runtime_equals_keras_and_its_workers_never_import_tensorflow(spark, demo_images, tmp_path, monkeypatch, model_cache):
    from fruit_assets.ml.model import random_weights

    # A model cache of its own, so that this test sees the conversion happen; random:0's weights are the
    # run's (computed once per run, in a fresh TensorFlow process of 5-7 CPU-s), not this test's subject.
    random_weights(0)
    (cache := tmp_path / "cache").mkdir()
    [computed] = model_cache.glob("*_random_0_*.npz")
    shutil.copy(computed, cache)
    monkeypatch.setenv("FRUIT_MODEL_CACHE", str(cache))
    import_log = tmp_path / "worker_imports.log"
    with guarded_workers(spark, import_log):
        first = materialize_all(local_resources(demo_images, tmp_path / "store"), selection=FEATURIZE)
        workers = probe_workers(spark)
    assert not import_log.exists(), import_log.read_text()
    assert all(w["guarded"] for w in workers), workers  # the probe ran in the guarded workers
    assert any(w["onnxruntime"] for w in workers), workers  # ... which are those that featurized
    assert all(w["tensorflow_like"] == "" for w in workers), workers
    assert "tensorflow" in sys.modules  # the driver (this process) did import it: the probe can tell

    metadata = metadata_of(first, "image_features")
    assert (metadata["runtime"], metadata["rows"], metadata["onnx_converted_now"]) == ("onnxruntime", 72, True)
    assert metadata["onnx_conversion_max_abs_diff_vs_keras"] < 1e-4
    stored = read_asset(tmp_path / "store", "image_features").sort_values("path", ignore_index=True)
    expected = keras_features("random:0", list(stored.path))
    assert np.abs(np.stack(stored.features) - expected).max() < 1e-4
    assert np.abs(expected[0] - expected[-1]).max() > 1e-2  # not a collapsed model

    # A second run with the same weights reads the converted model from the cache.
    second = materialize_all(local_resources(demo_images, tmp_path / "store"), selection=FEATURIZE)
    again = metadata_of(second, "image_features")
    assert (again["onnx_converted_now"], again["onnx_model_file"]) == (False, metadata["onnx_model_file"])


def test_conversion_is_cached_by_weights_fingerprint(tmp_path):
    from fruit_assets.ml.model import (
        feature_extractor_from_weights,
        feature_extractor_weights,
        parse_weights_setting,
        synthetic_images,
        weights_fingerprint,
    )
    from fruit_assets.ml.onnx_model import converted_model, onnx_inference_function

    # Seeds that other tests use too (random:1, random:0): their weights are computed once per run, in the
    # shared cache (a fresh TensorFlow process, 5-7 CPU-s each); what this test checks is its own ONNX cache.
    weights = feature_extractor_weights(parse_weights_setting("random:1"))
    fingerprint = weights_fingerprint(weights)
    first = converted_model(weights, fingerprint, tmp_path)
    assert first.converted and fingerprint in Path(first.path).name
    written = os.stat(first.path).st_mtime_ns
    second = converted_model(weights, fingerprint, tmp_path)
    assert not second.converted and second.path == first.path and second.data == first.data
    assert os.stat(first.path).st_mtime_ns == written
    assert second.info["max_abs_diff_vs_keras"] == first.info["max_abs_diff_vs_keras"] < 1e-4

    images = synthetic_images(99, 3)  # not the conversion's check batch
    expected = np.asarray(feature_extractor_from_weights(weights)(images, training=False))
    assert np.abs(onnx_inference_function(second.data)(images) - expected).max() < 1e-4

    # A damaged cache file is not used: it is converted again and replaced.
    Path(first.path).write_bytes(first.data[: len(first.data) // 2])
    repaired = converted_model(weights, fingerprint, tmp_path)
    assert repaired.converted and Path(first.path).read_bytes() == repaired.data  # a conversion is not byte-stable
    assert converted_model(weights, fingerprint, tmp_path).converted is False

    other = feature_extractor_weights(parse_weights_setting("random:0"))
    assert converted_model(other, weights_fingerprint(other), tmp_path).path != first.path


def test_a_failed_conversion_names_the_runtime_setting(tmp_path):
    from fruit_assets.ml.onnx_model import RuntimeUnavailableError, converted_model

    with pytest.raises(RuntimeUnavailableError, match=r"runtime \(feature_model resource\): converting the Keras model"):
        converted_model([np.zeros(3, dtype=np.float32)], "0123456789abcdef", tmp_path)
    assert not list(tmp_path.glob("*.onnx"))


def _with_model(resources, **settings):
    from fruit_assets.resources import FeatureModel

    resources["feature_model"] = FeatureModel(weights="random:0", **settings)
    return resources


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"runtime": "tensorrt"}, "runtime (feature_model resource)='tensorrt' is not a known runtime"),
        ({"onnx_providers": ["CUDAExecutionProvider"]}, "CUDAExecutionProvider not available"),
    ],
)
def test_unusable_runtime_settings_fail_before_any_work(spark, demo_images, tmp_path, settings, message):
    resources = _with_model(local_resources(demo_images, tmp_path), **settings)
    result = materialize_all(resources, selection=FEATURIZE, raise_on_error=False)
    assert not result.success and message in failure_text(result)
    assert not (tmp_path / "image_features").exists()


def test_missing_onnxruntime_is_a_clear_error_not_a_fallback(spark, demo_images, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    result = materialize_all(local_resources(demo_images, tmp_path), selection=FEATURIZE, raise_on_error=False)
    assert not result.success
    text = failure_text(result)
    assert "runtime (feature_model resource) is 'onnxruntime' but onnxruntime is not installed" in text
    assert "runtime: tensorflow" in text
    assert not (tmp_path / "image_features").exists()
