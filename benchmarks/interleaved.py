"""Interleaved comparisons of the model call in ONE process: the contenders alternate, round after round,
so that a machine whose load changes (a shared one) slows them alike and their ratio per round stays
readable. `python -m benchmarks.interleaved {runtimes,batches,arena} --weights W.h5 --onnx M.onnx`
(make both with `python -m benchmarks.featurize --quick` or `benchmarks.methods make-weights/make-onnx`;
they are in the work folder, default /tmp/fruit_benchmarks).

- runtimes: ONNX Runtime against the frozen TensorFlow graph (the two runtimes), batch --batch-size;
- batches:  ONNX Runtime at batch 2, 4, 8 and 16;
- arena:    ONNX Runtime with its CPU memory arena on (default) and off.
One intra-op and one inter-op thread each, as in the Spark workers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def _ort(data: bytes, arena: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_cpu_mem_arena = arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _contenders(args) -> dict:
    """name -> (inference function, batch size)."""
    data = Path(args.onnx).read_bytes()
    if args.compare == "batches":
        return {f"onnxruntime batch {b}": (_ort(data), b) for b in (2, 4, 8, 16)}
    if args.compare == "arena":
        return {"onnxruntime arena on": (_ort(data, True), args.batch_size), "onnxruntime arena off": (_ort(data, False), args.batch_size)}
    from fruit_assets.ml.model import (
        configure_tensorflow_threads,
        feature_extractor_weights,
        parse_weights_setting,
        tensorflow_inference_function,
    )

    configure_tensorflow_threads(1, 1)
    weights = feature_extractor_weights(parse_weights_setting(args.weights))
    return {
        "onnxruntime": (_ort(data), args.batch_size),
        "tensorflow frozen graph": (tensorflow_inference_function(weights, 1, 1), args.batch_size),
    }


def compare(args) -> dict:
    contenders = _contenders(args)
    inputs = {b: np.random.default_rng(0).uniform(-1, 1, (b, 224, 224, 3)).astype(np.float32) for _, b in contenders.values()}
    for call, b in contenders.values():
        call(inputs[b])  # first call: set-up, not timed
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, (call, b) in contenders.items():
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < args.seconds:
                call(inputs[b])
                images += b
            rates[name].append(round(images / (time.perf_counter() - started), 1))
    first, *others = rates
    return {
        "images_per_s_by_round": rates,
        "median_images_per_s": {name: float(np.median(v)) for name, v in rates.items()},
        "first_over_each_by_round": {o: [round(a / b, 2) for a, b in zip(rates[first], rates[o], strict=True)] for o in others},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.interleaved", description=__doc__.split("\n\n")[0])
    parser.add_argument("compare", choices=["runtimes", "batches", "arena"])
    parser.add_argument("--weights", help="runtimes: the .h5 weights file (or random:0)", default="random:0")
    parser.add_argument("--onnx", required=True, help="the converted model of the same weights")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0, help="per contender and round")
    args = parser.parse_args(argv)
    print(json.dumps(compare(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
