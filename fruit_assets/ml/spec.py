"""The feature extractor, defined in one place: a `ModelSpec`.

A spec says which model turns images into feature vectors: its name, how its Keras model is built, the
size of the square images it takes, how those images are preprocessed, and how many features it
returns. Everything else reads the spec: image decoding and the Spark workers (`featurize.py`), the
ONNX conversion and its cache names (`onnx_model.py`), the weights' fingerprint that stored features
are reused by (`model.py`), the feature checks and the PCA's dimension. Changing the model is changing
the spec.

`MOBILENET_V2` is the default. Specs are found by name in `SPECS` (`spec_named`): a process that
starts afresh (the random-weights subprocess, a Databricks step reading the staged model) finds the
spec there. Importing this module imports neither TensorFlow nor Keras. No Dagster here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class ModelInput:
    """What a Spark worker needs of a spec to feed its model. It travels to the workers alone: the rest
    of the spec (its build function) needs Keras, which workers of the onnxruntime runtime never import."""

    size: int  # images are decoded to size x size RGB
    preprocess: Callable[[np.ndarray], np.ndarray]  # uint8 (n, size, size, 3) -> float32 (n, size, size, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)


@dataclass(frozen=True)
class ModelSpec:
    """One feature extractor: everything about it that the rest of the project needs."""

    name: str  # in cache file names, in the metadata, and part of the weights fingerprint
    # weights -> the Keras model, (n, size, size, 3) preprocessed float32 -> (n, output_dim) float32. weights
    # as keras.applications takes them: None (initialised, for weights set afterwards), "imagenet", or a file.
    build: Callable[[str | None], keras.Model]
    inputs: ModelInput
    output_dim: int
    description: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):  # it names files
            raise ValueError(f"a model spec's name must be lowercase letters, digits and _, got {self.name!r}")

    def describe(self) -> dict:
        """JSON-able metadata recorded next to the features."""
        return {"model_spec": self.name, "model": self.description, "input_size": self.inputs.size, "feature_dim": self.output_dim}


def _uint8(batch: np.ndarray) -> np.ndarray:
    batch = np.asarray(batch)
    # Insisting on uint8 catches preprocessing an already preprocessed (float) batch twice.
    if batch.dtype != np.uint8:
        raise ValueError(f"preprocess expects a uint8 batch, got dtype {batch.dtype}")
    return batch


def scale_to_unit_range(batch: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1]: keras.applications.mobilenet_v2.preprocess_input ("tf" mode:
    x / 127.5 - 1, no RGB->BGR swap, which only caffe-mode models need), in numpy."""
    out = _uint8(batch).astype(np.float32)
    out /= np.float32(127.5)
    out -= np.float32(1.0)
    return out


def pixel_values(batch: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 255], unchanged: for models that scale inside themselves (Keras'
    EfficientNet, ConvNeXt)."""
    return _uint8(batch).astype(np.float32)


def _mobilenet_v2(weights: str | None) -> keras.Model:
    from fruit_assets.ml.model import mobilenet_v2

    return mobilenet_v2(weights)


MOBILENET_V2 = ModelSpec(
    name="mobilenet_v2",
    build=_mobilenet_v2,
    inputs=ModelInput(224, scale_to_unit_range),
    output_dim=1280,
    description="MobileNetV2 (alpha 1.0, 224x224) without its classifier: the global-average-pool output",
)
DEFAULT_SPEC = MOBILENET_V2
SPECS: dict[str, ModelSpec] = {MOBILENET_V2.name: MOBILENET_V2}


def register(spec: ModelSpec) -> ModelSpec:
    """Make `spec` findable by its name in this process; a name stands for one spec."""
    known = SPECS.setdefault(spec.name, spec)
    if known is not spec:
        raise ValueError(f"another model spec is registered as {spec.name!r}")
    return spec


def spec_named(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"no model spec named {name!r}; known: {', '.join(sorted(SPECS))}") from None
