"""The feature extractor of a model spec (`spec.py`) and its weights, and MobileNetV2's build.

Used on the Spark driver to resolve weights (`feature_extractor_weights`), and, with runtime
`tensorflow` only, inside Spark Python workers to rebuild the model from the broadcast arrays and run
it as a frozen graph (`tensorflow_inference_function`). With the default runtime (`onnxruntime`, see
`onnx_model.py`) workers never import this module's TensorFlow side. tensorflow/keras are imported
lazily inside functions: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fruit_assets.ml.spec import DEFAULT_SPEC, MOBILENET_V2, ModelSpec, spec_named

if TYPE_CHECKING:
    import keras

# MobileNetV2's (the default spec's). Code that serves any spec reads the spec instead.
FEATURE_DIM = MOBILENET_V2.output_dim
INPUT_SHAPE = MOBILENET_V2.inputs.shape

WEIGHTS_SETTING = "FRUIT_MODEL_WEIGHTS"
IMAGENET_WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
IMAGENET_NO_TOP_WEIGHTS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
_KINDS = ("imagenet", "file", "random")
_CALIBRATION_IMAGES = 8


class WeightsConfigError(ValueError):
    """The weights setting is invalid or names an unusable file."""


class WeightsUnavailableError(RuntimeError):
    """ImageNet weights could not be fetched (typically: no internet and nothing in the cache)."""


@dataclass(frozen=True)
class WeightsSource:
    kind: str  # "imagenet" | "file" | "random"
    path: str | None = None  # kind "file"
    seed: int | None = None  # kind "random"; None means 0

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"WeightsSource.kind must be one of {_KINDS}, got {self.kind!r}")
        if (self.kind == "file") != (self.path is not None):
            raise ValueError("WeightsSource.path is required for kind 'file' and only for it")
        if self.kind != "random" and self.seed is not None:
            raise ValueError("WeightsSource.seed is only for kind 'random'")
        if self.kind == "random" and self.seed is None:
            object.__setattr__(self, "seed", 0)

    def describe(self) -> dict:
        """JSON-able metadata recorded next to the features."""
        if self.kind == "imagenet":
            return {"weights_source": "imagenet", "weights_meaningful": True}
        if self.kind == "file":
            return {"weights_source": f"file:{self.path}", "weights_meaningful": True}
        return {
            "weights_source": f"random:{self.seed}",
            "weights_meaningful": False,
            "weights_seed": self.seed,
            "weights_note": (
                "random weights (seeded, BatchNorm calibrated on synthetic images): "
                "features are deterministic and vary with the image, but are NOT meaningful for "
                "real use"
            ),
        }


def _how_to_set(setting_name: str) -> str:
    return (
        f"set {setting_name} to imagenet, random[:seed], or the path of "
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224[_no_top].h5 "
        "(MobileNetV2 alpha 1.0, 224x224, legacy Keras .h5 weights, with or without top)"
    )


def parse_weights_setting(value: str, setting_name: str = WEIGHTS_SETTING) -> WeightsSource:
    """Parse "imagenet" | "random" | "random:<seed>" | <path of a .h5 weights file>."""
    text = (value or "").strip()
    lowered = text.lower()
    if not text:
        raise WeightsConfigError(f"{setting_name} is empty: {_how_to_set(setting_name)}")
    if lowered == "imagenet":
        return WeightsSource("imagenet")
    if lowered == "random":
        return WeightsSource("random", seed=0)
    if lowered.startswith("random:"):
        seed_text = text[len("random:") :]
        try:
            seed = int(seed_text)
        except ValueError:
            seed = -1
        if not 0 <= seed < 2**32:  # numpy RandomState's seed range
            raise WeightsConfigError(
                f"{setting_name}={value!r}: the seed must be an integer in [0, 2**32), "
                f"got {seed_text!r}; {_how_to_set(setting_name)}"
            )
        return WeightsSource("random", seed=seed)
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise WeightsConfigError(
            f"{setting_name}={value!r}: no such weights file ({path}); {_how_to_set(setting_name)}"
        )
    return WeightsSource("file", path=path)


def build_feature_extractor(source: WeightsSource, spec: ModelSpec = DEFAULT_SPEC) -> keras.Model:
    """The spec's model with these weights: preprocessed float32 images -> (n, spec.output_dim) float32."""
    from fruit_assets.plumbing.quiet import without_tensorflow_notices

    with without_tensorflow_notices():  # the process's first Keras build prints them (quiet.py)
        return _build_feature_extractor(source, spec)


def _build_feature_extractor(source: WeightsSource, spec: ModelSpec) -> keras.Model:
    if source.kind == "imagenet":
        return spec.build("imagenet")
    if source.kind == "file":
        assert source.path is not None
        return spec.build(source.path)
    assert source.seed is not None
    return _random_model(source.seed, spec)


def feature_extractor_weights(source: WeightsSource, spec: ModelSpec = DEFAULT_SPEC) -> list[np.ndarray]:
    """The weight arrays the Spark driver broadcasts to the workers (for `random`, read from the
    cache without importing TensorFlow)."""
    if source.kind == "random" and source.seed is not None:
        return random_weights(source.seed, spec)
    return build_feature_extractor(source, spec).get_weights()


def weights_fingerprint(weights: list[np.ndarray], spec: ModelSpec = DEFAULT_SPEC) -> str:
    """A short content hash of the spec's name and the weight arrays: identifies the model in worker
    caches, in the ONNX cache, in the stored features (reuse is keyed on it) and in the metadata. The
    name is in it because the same arrays under another spec (another preprocessing) give other
    features: they must never be reused for it."""
    digest = hashlib.sha256(f"{spec.name}\n".encode())
    for array in weights:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def feature_extractor_from_weights(weights: list[np.ndarray], spec: ModelSpec = DEFAULT_SPEC) -> keras.Model:
    """Worker side: rebuild the feature extractor from broadcast arrays. Never downloads anything."""
    from fruit_assets.plumbing.quiet import without_tensorflow_notices

    with without_tensorflow_notices():  # the process's first Keras build prints them (quiet.py)
        model = spec.build(None)
        model.set_weights(weights)
    return model


def tensorflow_inference_function(
    weights: list[np.ndarray], intra_op_threads: int = 1, inter_op_threads: int = 1, spec: ModelSpec = DEFAULT_SPEC
) -> Callable[[np.ndarray], np.ndarray]:
    """Worker side of runtime `tensorflow`: preprocessed float32 (n, size, size, 3) -> float32 (n, spec.output_dim).

    The model runs as one TensorFlow graph with its variables turned into constants: TensorFlow's graph
    optimizer (grappler) then folds every BatchNorm's scale and shift into the preceding convolution's
    weights and fuses the activations, about 1.25x a plain tf.function (BENCHMARKS.md). Results differ
    from model(x) by float rounding only (~1e-5 on unit-scale features). One graph serves any batch
    size (the last batch of a partition is smaller).
    """
    # TensorFlow's thread pools ignore OMP_NUM_THREADS that Spark sets; size them explicitly so that N
    # concurrent workers do not each spawn a pool as large as the machine.
    configure_tensorflow_threads(intra_op_threads, inter_op_threads)
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    model = feature_extractor_from_weights(weights, spec)
    signature = tf.TensorSpec([None, *spec.inputs.shape], tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(signature)
    frozen = convert_variables_to_constants_v2(graph)
    return lambda x: frozen(tf.constant(x))[0].numpy()


def configure_tensorflow_threads(intra_op: int, inter_op: int) -> None:
    """Set TF's thread pools; must run before TF executes any op to have an effect.

    Once TF is initialised the setters raise RuntimeError (unless the value is unchanged): the
    existing setting is then kept, which makes repeated calls (e.g. per Spark task) harmless.
    """
    import tensorflow as tf

    for setter, value in (
        (tf.config.threading.set_intra_op_parallelism_threads, intra_op),
        (tf.config.threading.set_inter_op_parallelism_threads, inter_op),
    ):
        with contextlib.suppress(RuntimeError):
            setter(value)


def mobilenet_v2(weights: str | None) -> keras.Model:
    """MOBILENET_V2's build: None (initialised only), "imagenet" (Keras' download and cache) or an .h5 file."""
    if weights is None:
        return _no_top_model(weights=None)
    if weights == "imagenet":
        return _imagenet_model()
    return _file_model(weights)


def _no_top_model(weights: str | None) -> keras.Model:
    import keras

    return keras.applications.MobileNetV2(
        include_top=False, pooling="avg", input_shape=INPUT_SHAPE, weights=weights
    )


def _imagenet_model() -> keras.Model:
    from fruit_assets.plumbing.quiet import keras_without_progress_bars

    try:
        # Keras downloads into and then reuses its cache: ~/.keras/models/ (or $KERAS_HOME/models/).
        with keras_without_progress_bars():
            return _no_top_model(weights="imagenet")
    except Exception as exc:
        # keras.utils.get_file raises a bare Exception("URL fetch failure on <url>: ...").
        if "URL fetch failure" not in str(exc):
            raise
        raise WeightsUnavailableError(
            f"ImageNet weights for MobileNetV2 could not be downloaded ({exc}). Provide them in one "
            f"of these ways: put {IMAGENET_NO_TOP_WEIGHTS_FILE} (or {IMAGENET_WEIGHTS_FILE}, with "
            f"top) in ~/.keras/models/ (or $KERAS_HOME/models/); or set {WEIGHTS_SETTING} to the "
            f"path of either file; or set {WEIGHTS_SETTING}=random for a deterministic but "
            "meaningless model (features not usable for real work)."
        ) from exc


def _file_model(path: str) -> keras.Model:
    import keras

    try:
        classes = _h5_top_classes(path)
        if classes is None:
            return _no_top_model(weights=path)
        full = keras.applications.MobileNetV2(
            include_top=True, input_shape=INPUT_SHAPE, weights=path, classes=classes
        )
        # layers[-2] is the GlobalAveragePooling2D before the classifier: the same output, and
        # the same weight list (order and shapes), as the no-top model with pooling="avg".
        return keras.Model(full.input, full.layers[-2].output, name=f"{full.name}_features")
    except Exception as exc:
        raise WeightsConfigError(
            f"{WEIGHTS_SETTING}: could not load {path}: {type(exc).__name__}: {exc}. The file must "
            "hold MobileNetV2 weights (alpha 1.0, 224x224) in legacy Keras .h5 format, like "
            f"{IMAGENET_NO_TOP_WEIGHTS_FILE} or {IMAGENET_WEIGHTS_FILE}."
        ) from exc


def _h5_top_classes(path: str) -> int | None:
    """Number of classes of the classifier in a legacy Keras .h5 weights file, None if no top.

    Decided from structure, not names: the last layer holding weights has a 2-D (Dense) kernel
    only with top. The classifier is named "predictions" by today's Keras but "Logits" in the
    keras_applications code the published files came from.
    """
    import h5py

    with h5py.File(path, "r") as f:
        # Weights-only files carry `layer_names` at the root; full-model files under model_weights.
        group = f if "layer_names" in f.attrs else f.get("model_weights")
        if group is None or "layer_names" not in group.attrs:
            raise ValueError("not a legacy Keras .h5 weights file (no layer_names attribute)")
        for name in reversed(list(group.attrs["layer_names"])):
            layer = group[_text(name)]
            weight_names = layer.attrs.get("weight_names", [])
            if len(weight_names):
                kernel = layer[_text(weight_names[0])]
                return int(kernel.shape[-1]) if kernel.ndim == 2 else None
    raise ValueError("the file holds no weights")


def _text(value: str | bytes) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else value


def _random_model(seed: int, spec: ModelSpec) -> keras.Model:
    """The spec's model, seeded random weights, BatchNorm statistics calibrated so that features vary.

    With default moving statistics (mean 0, variance 1) the activations of a randomly
    initialised MobileNetV2 shrink layer after layer: the pooled features end up ~1e-12 and every
    image gets the same vector. Calibrating each BatchNormalization on a fixed synthetic batch
    keeps activations at unit scale.
    """
    weights = random_weights(seed, spec)
    # Building a model draws initializer seeds from Python's and numpy's global generators (which are
    # overwritten right after): restore them so that a build does not change the caller's streams.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        model = spec.build(None)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    model.set_weights(weights)
    return model


def random_weights(seed: int, spec: ModelSpec = DEFAULT_SPEC) -> list[np.ndarray]:
    """The weights of `random:<seed>` for the spec, the same in every process on this machine.

    TensorFlow's kernels round differently with different thread counts (measured: the training-mode
    pass and depthwise convolutions differ in the last bit between 1 and 2 intra-op threads), and a
    process cannot change its thread pools once TensorFlow has started. So the weights are computed
    once in a fresh single-threaded process and cached on disk (FRUIT_MODEL_CACHE), keyed by seed and
    TensorFlow/Keras versions; every later build reads the file, without TensorFlow. The subprocess finds
    the spec by its name (`spec.SPECS`)."""
    from fruit_assets.ml.onnx_model import cache_lock

    path = _random_weights_path(seed, spec)
    if not path.exists():
        with cache_lock(path):  # computed once, if other processes want the same seed now
            if not path.exists():
                _compute_in_subprocess(seed, path, spec)
    with np.load(path) as stored:
        return [stored[f"w{i:03d}"] for i in range(len(stored.files))]


def _random_weights_path(seed: int, spec: ModelSpec) -> Path:
    from importlib.metadata import version

    from fruit_assets.ml.onnx_model import cache_dir

    tag = hashlib.sha256(f"{version('keras')}|{_tensorflow_version()}|{_CALIBRATION_IMAGES}".encode()).hexdigest()[:8]
    return cache_dir() / f"{spec.name}_random_{seed}_{tag}.npz"


def _tensorflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("tensorflow-cpu", "tensorflow"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "unknown"


def _compute_in_subprocess(seed: int, path: Path, spec: ModelSpec) -> None:
    command = [sys.executable, "-m", "fruit_assets.ml.model", "random-weights", spec.name, str(seed), str(path)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not path.exists():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise RuntimeError(f"computing the random:{seed} weights failed (exit {done.returncode}):\n{tail}")


def _compute_random_weights(spec: ModelSpec, seed: int, path: Path) -> None:
    """In the fresh process: one TensorFlow thread, seeded build, calibration, atomic save."""
    import keras

    configure_tensorflow_threads(1, 1)
    keras.utils.set_random_seed(seed)
    model = spec.build(None)
    _calibrate_batchnorm(model, synthetic_images(seed, _CALIBRATION_IMAGES, spec.inputs.size))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(partial, "wb") as out:
        np.savez(out, **{f"w{i:03d}": w for i, w in enumerate(model.get_weights())})
    os.replace(partial, path)


def _calibrate_batchnorm(model: keras.Model, images: np.ndarray) -> None:
    """Set every BatchNorm's moving mean/variance to its input statistics on `images`.

    One forward pass in training mode does it: there each BN normalises with the batch's own
    statistics, which is exactly what it does at inference once its moving statistics are those
    batch statistics, so each BN input seen in that pass is its input under calibrated inference.
    (The pass also nudges the moving statistics by `momentum`; they are overwritten right after.)
    """
    import keras

    bn_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.input, [bn.input for bn in bn_layers])
    bn_inputs = probe(images, training=True)
    for bn, x in zip(bn_layers, bn_inputs, strict=True):
        x = np.asarray(x, dtype=np.float64)  # float64 sums: exact enough and order-independent
        bn.moving_mean.assign(x.mean(axis=(0, 1, 2)).astype(np.float32))
        bn.moving_variance.assign(x.var(axis=(0, 1, 2)).astype(np.float32))  # biased, like BN


def synthetic_images(seed: int, n: int, size: int = MOBILENET_V2.inputs.size) -> np.ndarray:
    """n smooth random size x size images in [-1, 1] (MobileNetV2's preprocessed range), deterministic in `seed`.

    Sums of bilinearly upsampled random grids at a few scales: low-frequency structure plus some
    detail, closer to photos than pixel-wise noise.
    """
    rs = np.random.RandomState(seed)
    images = np.zeros((n, size, size, 3))
    for cells, amplitude in ((2, 1.0), (8, 0.6), (32, 0.3)):
        grid = rs.uniform(-1.0, 1.0, (n, cells, cells, 3))
        images += amplitude * _upsample(_upsample(grid, size, axis=1), size, axis=2)
    images /= np.abs(images).max(axis=(1, 2, 3), keepdims=True)
    return images.astype(np.float32)


def _upsample(values: np.ndarray, size: int, axis: int) -> np.ndarray:
    """Linear interpolation of `values` onto `size` points along `axis`.

    Element-wise (no BLAS, whose sums may depend on CPU and threads): bit-reproducible.
    """
    cells = values.shape[axis]
    position = np.linspace(0.0, cells - 1, size)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, cells - 1)
    fraction = (position - low).reshape([-1 if a == axis else 1 for a in range(values.ndim)])
    return np.take(values, low, axis) * (1.0 - fraction) + np.take(values, high, axis) * fraction


if __name__ == "__main__":  # python -m fruit_assets.ml.model random-weights SPEC SEED PATH (see random_weights)
    if len(sys.argv) != 5 or sys.argv[1] != "random-weights":
        raise SystemExit("usage: python -m fruit_assets.ml.model random-weights SPEC SEED PATH")
    _compute_random_weights(spec_named(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
