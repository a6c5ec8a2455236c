"""The feature extractor as an ONNX model: converted once on the driver, run by ONNX Runtime in workers.

Keras stays the source of the model (its spec's build, `spec.py`, with `imagenet`, a weights file or
`random[:seed]`, see `model.py`). The driver converts it (tf2onnx, opset 17) the first time it meets a
set of weights, checks the result against Keras, and caches the file on disk under the spec's name and
the weights' fingerprint: later runs with
the same weights load the file and never convert again (`converted_model`). The Spark Python workers
get the file's bytes by broadcast and run it with ONNX Runtime (`onnx_inference_function`): they
never import TensorFlow or Keras, which saves most of their memory and start-up.

Driver side imports TensorFlow and tf2onnx lazily, inside functions; importing this module imports
neither, nor onnxruntime. No Dagster here. No silent fallback: a missing package or a failed
conversion raises `RuntimeUnavailableError`, naming the `runtime` setting.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from fruit_assets.ml.spec import DEFAULT_SPEC, ModelSpec

OPSET = 17
INPUT_NAME = "images"
CACHE_SETTING = "FRUIT_MODEL_CACHE"
RUNTIME_SETTING = "runtime (feature_model resource)"
PROVIDERS_SETTING = "onnx_providers (feature_model resource)"
# The converted model must reproduce Keras' model(x, training=False) on a check batch within this,
# relative to the features' scale (max(1, largest |feature|)); fp32 conversions measure ~1e-5.
CONVERSION_TOLERANCE = 1e-4
_CHECK_IMAGES = 4
_CHECK_SEED = 12345
# Packages whose versions change the converted graph: part of the cache key.
_CONVERTER_PACKAGES = ("tf2onnx", "onnx", "tensorflow-cpu", "tensorflow", "keras")


class RuntimeUnavailableError(RuntimeError):
    """The configured inference runtime cannot be used (package missing, conversion failed)."""


@dataclass(frozen=True)
class ConvertedModel:
    """An ONNX feature extractor for one set of weights, and how it was obtained."""

    data: bytes  # the serialized ONNX model, broadcast to the workers
    path: str  # where it is cached
    converted: bool  # True: converted in this call; False: read from the cache
    seconds: float  # time to convert (and check), or to read the cached file
    info: dict  # written at conversion: versions, opset, max abs diff against Keras on the check batch

    def describe(self) -> dict:
        """JSON-able metadata recorded next to the features."""
        return {
            "onnx_model_file": self.path,
            "onnx_converted_now": self.converted,
            "onnx_model_seconds": round(self.seconds, 2),
            "onnx_opset": self.info["opset"],
            "onnx_converter": f"tf2onnx {self.info['versions'].get('tf2onnx')}",
            "onnx_conversion_max_abs_diff_vs_keras": self.info["max_abs_diff_vs_keras"],
        }


def cache_dir() -> Path:
    """FRUIT_MODEL_CACHE, or ~/.cache/fruit_assets/models (XDG_CACHE_HOME respected)."""
    configured = os.environ.get(CACHE_SETTING, "").strip()
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base) / "fruit_assets" / "models"


def _versions() -> dict[str, str | None]:
    found = {}
    for package in _CONVERTER_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def cache_path(fingerprint: str, directory: Path | None = None, spec: ModelSpec = DEFAULT_SPEC) -> Path:
    """The cached file of the spec's model with the weights `fingerprint`, for this converter, opset and
    TF/Keras. Two specs never share a file (the fingerprint covers the spec's name too)."""
    tag = json.dumps({"opset": OPSET, **_versions()}, sort_keys=True)
    converter = hashlib.sha256(tag.encode()).hexdigest()[:8]
    return (directory or cache_dir()) / f"{spec.name}_features_{fingerprint}_{converter}.onnx"


def require_packages(runtime_only: bool = False) -> None:
    """Fail clearly, naming the setting, if onnxruntime (or, on the driver, the converter) is missing."""
    needed = ("onnxruntime",) if runtime_only else ("onnxruntime", "tf2onnx", "onnx")
    missing = [name for name in needed if _missing(name)]
    if missing:
        raise RuntimeUnavailableError(
            f"{RUNTIME_SETTING} is 'onnxruntime' but {', '.join(missing)} is not installed here: install the "
            "versions pinned in pyproject.toml (onnxruntime==1.32.0, tf2onnx==1.17.0, onnx==1.23.2), or set "
            "runtime: tensorflow"
        )


def _missing(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is None  # None blocks an import (Python's convention)
    return importlib.util.find_spec(name) is None


def converted_model(
    weights: list[np.ndarray], fingerprint: str, directory: Path | None = None, spec: ModelSpec = DEFAULT_SPEC
) -> ConvertedModel:
    """The ONNX model of the spec with these weights: from the cache, or converted, checked and cached now."""
    require_packages()
    path = cache_path(fingerprint, directory, spec)
    sidecar = path.with_suffix(".json")
    started = time.perf_counter()
    cached = _read_cached(path, sidecar)
    if cached is not None:
        return ConvertedModel(cached[0], str(path), False, time.perf_counter() - started, cached[1])
    with cache_lock(path):
        cached = _read_cached(path, sidecar)  # another process may have made it while this one waited
        if cached is not None:
            return ConvertedModel(cached[0], str(path), False, time.perf_counter() - started, cached[1])
        return _convert_into_cache(weights, spec, fingerprint, path, sidecar, started)


@contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """One process at a time makes the cache entry `path`: concurrent runs on one machine (or parallel
    test workers) that need the same model wait for the first one's conversion and then read it,
    instead of each converting it again. The lock is advisory (flock), beside the entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into_cache(
    weights: list[np.ndarray], spec: ModelSpec, fingerprint: str, path: Path, sidecar: Path, started: float
) -> ConvertedModel:
    try:
        data, difference = _convert_and_check(weights, spec)
    except RuntimeUnavailableError:
        raise
    except Exception as error:
        raise RuntimeUnavailableError(
            f"{RUNTIME_SETTING}: converting the Keras model to ONNX failed ({type(error).__name__}: {error}); "
            "set runtime: tensorflow to run the frozen TensorFlow graph instead"
        ) from error
    info = {"opset": OPSET, "versions": _versions(), "model_spec": spec.name, "fingerprint": fingerprint,
            "max_abs_diff_vs_keras": difference,
            "sha256": hashlib.sha256(data).hexdigest()}
    _write_atomically(path, data)
    _write_atomically(sidecar, json.dumps(info, indent=1).encode())
    return ConvertedModel(data, str(path), True, time.perf_counter() - started, info)


def _read_cached(path: Path, sidecar: Path) -> tuple[bytes, dict] | None:
    """The cached model and its record, or None when absent, incomplete or altered (then it is
    converted again and replaced)."""
    try:
        data, info = path.read_bytes(), json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return (data, info) if info.get("sha256") == hashlib.sha256(data).hexdigest() else None


def _convert_and_check(weights: list[np.ndarray], spec: ModelSpec) -> tuple[bytes, float]:
    """(ONNX bytes, largest |ONNX - Keras| on the check batch) of the spec's model with these weights."""
    from fruit_assets.ml.model import feature_extractor_from_weights

    model = feature_extractor_from_weights(weights, spec)  # drops TensorFlow's notices, which the first build prints
    data = _convert(model, spec)
    return data, _check_against_keras(data, model, spec)


def _convert(model, spec: ModelSpec) -> bytes:
    """Keras model(x, training=False) -> ONNX bytes, any batch size, input (n, size, size, 3) float32."""
    import tensorflow as tf
    import tf2onnx

    function = tf.function(lambda x: model(x, training=False))
    signature = [tf.TensorSpec([None, *spec.inputs.shape], tf.float32, name=INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=OPSET)
    return proto.SerializeToString()


def _check_against_keras(data: bytes, model, spec: ModelSpec) -> float:
    """Largest |ONNX - Keras| on a fixed synthetic batch, preprocessed as the spec does; raises beyond
    CONVERSION_TOLERANCE."""
    from fruit_assets.ml.model import synthetic_images

    smooth = synthetic_images(_CHECK_SEED, _CHECK_IMAGES, spec.inputs.size)  # in [-1, 1]
    images = spec.inputs.preprocess(np.round((smooth + 1) * 127.5).astype(np.uint8))
    expected = np.asarray(model(images, training=False), dtype=np.float32)
    actual = onnx_inference_function(data)(images)
    difference = float(np.abs(actual - expected).max())
    scale = max(1.0, float(np.abs(expected).max()))
    if not difference <= CONVERSION_TOLERANCE * scale:  # also catches NaN
        raise RuntimeUnavailableError(
            f"{RUNTIME_SETTING}: the converted ONNX model differs from Keras by {difference:.3g} on the check "
            f"batch (allowed {CONVERSION_TOLERANCE * scale:.3g}); set runtime: tensorflow"
        )
    return difference


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename: a concurrent reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def check_providers(providers: Sequence[str]) -> None:
    """Refuse execution providers this onnxruntime build does not have (e.g. CUDA without onnxruntime-gpu)."""
    require_packages(runtime_only=True)
    import onnxruntime

    available = onnxruntime.get_available_providers()
    missing = [name for name in providers if name not in available]
    if missing or not providers:
        raise RuntimeUnavailableError(
            f"{PROVIDERS_SETTING}={','.join(providers)!r}: {', '.join(missing) or 'none given'} not available in "
            f"this onnxruntime build (available: {', '.join(available)}); CUDAExecutionProvider needs onnxruntime-gpu"
        )


def onnx_inference_function(
    data: bytes,
    intra_op_threads: int = 1,
    inter_op_threads: int = 1,
    allow_spinning: bool = False,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> Callable[[np.ndarray], np.ndarray]:
    """preprocessed float32 (n, size, size, 3) -> float32 (n, output_dim), by an ONNX Runtime session.

    Worker side. Spark runs one Python worker per core, so each session gets one intra-op and one
    inter-op thread by default. With spinning off, a thread that runs out of work sleeps instead of
    busy-waiting for more (with more than one thread, spinning threads would take CPU from the other
    workers)."""
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise RuntimeUnavailableError(
            f"{RUNTIME_SETTING} is 'onnxruntime' but the Spark Python workers cannot import it ({error}): install "
            "onnxruntime==1.32.0 on the cluster (libraries), or set runtime: tensorflow"
        ) from error
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spinning = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    session = ort.InferenceSession(data, sess_options=options, providers=list(providers))
    name = session.get_inputs()[0].name

    def infer(images: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(images, dtype=np.float32)})[0]

    return infer
