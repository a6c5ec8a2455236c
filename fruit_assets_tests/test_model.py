"""Tests of the MobileNetV2 feature extractor, with real TensorFlow (no mocks).

Models are built once per module (fixtures) to keep the runtime small.
"""

import hashlib
import inspect
import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from fruit_assets.ml.model import (
    FEATURE_DIM,
    IMAGENET_NO_TOP_WEIGHTS_FILE,
    IMAGENET_WEIGHTS_FILE,
    INPUT_SHAPE,
    WeightsConfigError,
    WeightsSource,
    WeightsUnavailableError,
    build_feature_extractor,
    configure_tensorflow_threads,
    feature_extractor_from_weights,
    feature_extractor_weights,
    parse_weights_setting,
)
from fruit_assets_tests.weights_files import save_legacy_h5

pytestmark = pytest.mark.slow  # builds TensorFlow models or converts them


def weights_hash(weights):
    digest = hashlib.sha256()
    for w in weights:
        digest.update(str((w.dtype, w.shape)).encode())
        digest.update(np.ascontiguousarray(w).tobytes())
    return digest.hexdigest()


# The same function in the subprocesses below.
HASH_CODE = "import hashlib, numpy as np\n" + inspect.getsource(weights_hash)


def _images(seed: int, n: int = 6) -> np.ndarray:
    """Preprocessed-range test images: half smooth gradients with blobs, half pixel noise."""
    rs = np.random.RandomState(seed)
    ramp = np.linspace(-1, 1, INPUT_SHAPE[0], dtype=np.float32)
    smooth = [
        np.clip(
            rs.uniform(-1, 1, 3) * ramp[:, None, None] + rs.uniform(-1, 1, 3) * ramp[None, :, None]
            + (np.hypot(*np.meshgrid(ramp - rs.uniform(-1, 1), ramp - rs.uniform(-1, 1))) < 0.4)[..., None],
            -1,
            1,
        )
        for _ in range(n // 2)
    ]
    noise = rs.uniform(-1, 1, (n - n // 2, *INPUT_SHAPE))
    return np.concatenate([np.stack(smooth), noise]).astype(np.float32)


def _features(model, x):
    return np.asarray(model(x, training=False))


@pytest.fixture(scope="module")
def random1():
    start = time.perf_counter()
    model = build_feature_extractor(parse_weights_setting("random:1"))
    print(f"random:1 build + calibration: {time.perf_counter() - start:.2f}s")
    return model


@pytest.fixture(scope="module")
def images():
    return _images(seed=123)


@pytest.fixture(scope="module")
def random1_features(random1, images):
    return _features(random1, images)


# --- parse_weights_setting / WeightsSource -------------------------------------------------------


def test_parse_keywords():
    assert parse_weights_setting("imagenet") == WeightsSource("imagenet")
    assert parse_weights_setting(" ImageNet ") == WeightsSource("imagenet")
    assert parse_weights_setting("random") == WeightsSource("random", seed=0)
    assert parse_weights_setting("RANDOM:42") == WeightsSource("random", seed=42)
    assert WeightsSource("random").seed == 0


@pytest.mark.parametrize("value", ["", "   ", "random:abc", "random:-1", "random:", "/nonexistent/w.h5"])
def test_parse_rejects(value):
    with pytest.raises(WeightsConfigError) as error:
        parse_weights_setting(value)
    message = str(error.value)
    assert "FRUIT_MODEL_WEIGHTS" in message
    assert "imagenet, random[:seed]" in message
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224[_no_top].h5" in message
    if value.startswith("/"):
        assert value in message


def test_parse_names_custom_setting():
    with pytest.raises(WeightsConfigError, match="MY_SETTING"):
        parse_weights_setting("nope.h5", setting_name="MY_SETTING")


def test_parse_file_is_absolute(tmp_path, monkeypatch):
    (tmp_path / "w.h5").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert parse_weights_setting("w.h5") == WeightsSource("file", path=str(tmp_path / "w.h5"))


def test_describe_is_json_able():
    assert WeightsSource("imagenet").describe() == {"weights_source": "imagenet", "weights_meaningful": True}
    assert WeightsSource("file", path="/w.h5").describe() == {
        "weights_source": "file:/w.h5",
        "weights_meaningful": True,
    }
    described = WeightsSource("random", seed=3).describe()
    assert described["weights_source"] == "random:3"
    assert described["weights_meaningful"] is False
    assert described["weights_seed"] == 3
    assert "NOT meaningful" in described["weights_note"]
    for source in (WeightsSource("imagenet"), WeightsSource("random", seed=3)):
        assert json.loads(json.dumps(source.describe())) == source.describe()


# --- random weights ------------------------------------------------------------------------------


def test_random_features_vary_and_are_finite(random1, random1_features):
    features = random1_features
    assert features.shape == (len(features), FEATURE_DIM)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    # An uncalibrated random MobileNetV2 gives std ~1e-12 here: every image the same vector.
    std = features.std(axis=0)
    print(f"feature std across images, mean over dims: {std.mean():.3f}; smooth-only: "
          f"{features[:3].std(axis=0).mean():.3f}; noise-only: {features[3:].std(axis=0).mean():.3f}")
    assert std.mean() > 0.1
    assert (std > 1e-4).mean() > 0.9  # nearly every dimension carries signal
    # distinct images, distinct vectors
    distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
    assert distances[~np.eye(len(features), dtype=bool)].min() > 1e-2


def test_random_is_deterministic_in_process(random1):
    # built again after other models were built in this process
    assert weights_hash(feature_extractor_weights(WeightsSource("random", seed=1))) == weights_hash(
        random1.get_weights()
    )
    assert weights_hash(feature_extractor_weights(WeightsSource("random", seed=0))) != weights_hash(
        random1.get_weights()
    )


def test_random_build_leaves_global_random_state_alone(random1):
    import random

    np.random.seed(1)
    random.seed(1)
    expected = (np.random.rand(), random.random())
    np.random.seed(1)
    random.seed(1)
    feature_extractor_weights(WeightsSource("random", seed=0))
    assert (np.random.rand(), random.random()) == expected


def test_random_is_deterministic_across_processes_and_thread_counts(random1, tmp_path):
    # Each subprocess sets its own TF thread pools first (testing configure_tensorflow_threads too)
    # and has its own empty weights cache, so each computes the weights itself: they must not depend
    # on the thread pools of the process that asks for them.
    code = HASH_CODE + """
import sys, tensorflow as tf
from fruit_assets.ml.model import configure_tensorflow_threads, feature_extractor_weights, WeightsSource
n = int(sys.argv[1])
configure_tensorflow_threads(n, n)
weights = feature_extractor_weights(WeightsSource("random", seed=1))
tf.constant(1.0) + 1.0  # reading the cache needs no TensorFlow: start it here
configure_tensorflow_threads(n + 1, n + 1)  # TF is initialised now: kept as is, no error
print(weights_hash(weights), tf.config.threading.get_intra_op_parallelism_threads(),
      tf.config.threading.get_inter_op_parallelism_threads())
"""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(n)],
            stdout=subprocess.PIPE,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "FRUIT_MODEL_CACHE": str(tmp_path / f"cache{n}")},
            text=True,
        )
        for n in (1, 2)
    ]
    outputs = [p.communicate(timeout=300)[0].split() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    expected = weights_hash(random1.get_weights())
    assert outputs == [[expected, "1", "1"], [expected, "2", "2"]]


def test_configure_threads_after_initialisation_is_harmless(random1):
    import tensorflow as tf

    before = tf.config.threading.get_intra_op_parallelism_threads()
    configure_tensorflow_threads(before + 3, 5)
    configure_tensorflow_threads(before + 3, 5)
    assert tf.config.threading.get_intra_op_parallelism_threads() == before


def test_from_weights_reproduces_features(random1, images, random1_features):
    rebuilt = feature_extractor_from_weights(random1.get_weights())
    np.testing.assert_array_equal(_features(rebuilt, images), random1_features)
    # predict_on_batch runs a tf.function graph: TF fuses ops differently than eagerly, so the
    # features agree only to ~1e-5, not bit for bit.
    np.testing.assert_allclose(rebuilt.predict_on_batch(images), random1_features, atol=1e-4)


# --- weights files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weight_files(random1, tmp_path_factory):
    """Legacy .h5 files holding random1's weights: without top, and with a (random) top."""
    import keras

    directory = tmp_path_factory.mktemp("weights")
    no_top = directory / IMAGENET_NO_TOP_WEIGHTS_FILE
    save_legacy_h5(random1, no_top)

    with_top_model = keras.applications.MobileNetV2(include_top=True, input_shape=INPUT_SHAPE, weights=None)
    top_weights = with_top_model.get_weights()
    assert [w.shape for w in top_weights[:-2]] == [w.shape for w in random1.get_weights()]
    with_top_model.set_weights(random1.get_weights() + top_weights[-2:])
    with_top = directory / IMAGENET_WEIGHTS_FILE
    save_legacy_h5(with_top_model, with_top)
    return {"no_top": no_top, "with_top": with_top}


@pytest.mark.parametrize("kind", ["no_top", "with_top"])
def test_weights_file_gives_same_features(kind, weight_files, images, random1_features):
    source = parse_weights_setting(str(weight_files[kind]))
    assert source == WeightsSource("file", path=str(weight_files[kind]))
    start = time.perf_counter()
    model = build_feature_extractor(source)
    print(f"{kind} file build: {time.perf_counter() - start:.2f}s")
    assert model.output_shape == (None, FEATURE_DIM)
    features = _features(model, images)
    assert np.abs(features - random1_features).max() < 1e-5
    # What the workers do with the broadcast weights gives the same features too: the weight
    # list of the cut with-top model has the no-top model's order and shapes.
    rebuilt = feature_extractor_from_weights(feature_extractor_weights(source))
    np.testing.assert_array_equal(_features(rebuilt, images), features)


def test_full_model_legacy_h5_file(random1, tmp_path, images, random1_features):
    # model.save("x.h5") files keep the weights under a model_weights group
    path = tmp_path / "full_model.h5"
    random1.save(path)
    with h5py.File(path) as f:
        assert "model_weights" in f and "layer_names" not in f.attrs
    features = _features(build_feature_extractor(parse_weights_setting(str(path))), images)
    assert np.abs(features - random1_features).max() < 1e-5


def _assert_config_error(path):
    with pytest.raises(WeightsConfigError) as error:
        build_feature_extractor(parse_weights_setting(str(path)))
    message = str(error.value)
    assert "FRUIT_MODEL_WEIGHTS" in message
    assert str(path) in message
    assert "MobileNetV2" in message and "alpha 1.0" in message
    return message


def test_text_file_named_h5(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_text("not hdf5\n")
    _assert_config_error(path)


def test_h5_of_other_architecture(tmp_path):
    import keras

    tiny = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="predictions")])
    path = tmp_path / "tiny.h5"
    save_legacy_h5(tiny, path)
    _assert_config_error(path)


def test_h5_of_other_mobilenet_width(tmp_path):
    import keras

    narrow = keras.applications.MobileNetV2(
        alpha=0.35, include_top=False, pooling="avg", input_shape=INPUT_SHAPE, weights=None
    )
    path = tmp_path / "alpha035.h5"
    save_legacy_h5(narrow, path)
    _assert_config_error(path)


def test_h5_that_is_not_keras(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    assert "not a legacy Keras .h5 weights file" in _assert_config_error(path)


# --- imagenet ------------------------------------------------------------------------------------


def test_imagenet_offline_raises_helpful_error():
    from keras.src.backend.config import keras_home

    cached = os.path.join(os.path.expanduser(keras_home()), "models", IMAGENET_NO_TOP_WEIGHTS_FILE)
    if os.path.exists(cached):
        pytest.skip(f"{cached} exists, so ImageNet weights load instead of failing")
    start = time.perf_counter()
    try:
        build_feature_extractor(WeightsSource("imagenet"))
    except WeightsUnavailableError as error:
        message = str(error)
    else:
        pytest.skip("this machine is online: ImageNet weights were downloaded, offline case untestable")
    elapsed = time.perf_counter() - start
    print(f"imagenet failure after {elapsed:.2f}s")
    assert elapsed < 30
    assert "could not be downloaded" in message
    assert "URL fetch failure" in message  # the underlying cause
    for text in (IMAGENET_NO_TOP_WEIGHTS_FILE, IMAGENET_WEIGHTS_FILE, "~/.keras/models/",
                 "FRUIT_MODEL_WEIGHTS", "FRUIT_MODEL_WEIGHTS=random"):
        assert text in message
