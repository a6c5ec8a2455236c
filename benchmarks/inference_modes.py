"""Ways of calling the model that the benchmarks compare, moved out of the package: the package ships
only the runtimes it runs (`onnxruntime`, the default, and `tensorflow`, the frozen graph; see
`fruit_assets.ml.featurize`). Used by `python -m benchmarks.methods micro-model`.

TensorFlow modes take a Keras model; `frozen` is the package's own `tensorflow` runtime.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TENSORFLOW_MODES = ("call", "predict", "predict_on_batch", "function", "xla", "frozen")
ONNX_MODES = ("onnxruntime",)


def tensorflow_mode(model, mode: str, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """preprocessed float32 (n, 224, 224, 3) -> float32 (n, 1280) by `mode`:
    "call": eager, op by op; "predict_on_batch" / "predict": through Keras' predict machinery;
    "function": one graph (tf.function) reading the weights as variables; "xla": the same, compiled;
    "frozen": the graph with its weights folded in as constants (the package's `tensorflow` runtime)."""
    if mode == "call":
        return lambda x: np.asarray(model(x, training=False), dtype=np.float32)
    if mode == "predict":
        return lambda x: np.asarray(model.predict(x, batch_size=len(x), verbose=0), dtype=np.float32)
    if mode == "predict_on_batch":
        return lambda x: np.asarray(model.predict_on_batch(x), dtype=np.float32)
    if mode in ("function", "xla"):
        import tensorflow as tf

        spec = [tf.TensorSpec([None, *model.input_shape[1:]], tf.float32)]
        graph = tf.function(lambda x: model(x, training=False), input_signature=spec, jit_compile=mode == "xla")
        return lambda x: graph(x).numpy()
    if mode == "frozen":
        from fruit_assets.ml.model import tensorflow_inference_function

        return tensorflow_inference_function(model.get_weights(), threads, 1)
    raise ValueError(f"unknown inference mode {mode!r}")
