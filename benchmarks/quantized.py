"""Reduced precision, tried once: ONNX Runtime dynamic int8 quantization of the converted model,
measured against fp32 on real images (`python -m benchmarks.methods quant-check ...`).

Not in the package: the error it measured is far beyond any threshold the features could honestly be
held to (BENCHMARKS.md, "Reduced precision"), so the pipeline has no reduced-precision mode.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def quantized_path(onnx_path: str) -> Path:
    """The dynamic int8 quantization of the fp32 ONNX file (made once, next to it)."""
    source = Path(onnx_path)
    target = source.with_name(source.stem + ".int8-dynamic.onnx")
    if not target.exists():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
    return target


def int8_inference_function(onnx_path: str, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(quantized_path(onnx_path)), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """How far `other` is from `reference` (n images x 1280), next to how far the images are from
    each other: error / spread is the RMS distance of a vector from its fp32 value over the RMS
    distance of the fp32 vectors from their mean (1.0: as far off as a random other image)."""
    error = np.sqrt(((other - reference) ** 2).sum(axis=1).mean())
    spread = np.sqrt(((reference - reference.mean(axis=0)) ** 2).sum(axis=1).mean())
    cosine = (other * reference).sum(axis=1) / (np.linalg.norm(other, axis=1) * np.linalg.norm(reference, axis=1))
    relative = np.linalg.norm(other - reference, axis=1) / np.linalg.norm(reference, axis=1)
    return {
        "max_abs_diff": float(np.abs(other - reference).max()),
        "error_over_spread": float(error / spread),
        "relative_l2_max": float(relative.max()),
        "cosine_min": float(cosine.min()),
        "nearest_neighbour_kept": float(_nearest_kept(reference, other)),
    }


def _nearest_kept(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of images whose nearest other image is the same in both feature sets."""

    def nearest(x):
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
        np.fill_diagonal(d, np.inf)
        return d.argmin(axis=1)

    return float((nearest(reference) == nearest(other)).mean())


def quant_check(args) -> dict:
    """fp32 and int8 ONNX Runtime on the same decoded images: agreement and speed (one thread)."""
    import time

    from benchmarks.methods import image_paths
    from fruit_assets.ml.featurize import load_batch
    from fruit_assets.ml.onnx_model import onnx_inference_function
    from fruit_assets.ml.spec import scale_to_unit_range as preprocess

    images, errors = load_batch(image_paths(args.images)[: args.limit])
    x = preprocess(images)
    results = {"images": len(x)}
    outputs = {}
    for name, call in (("fp32", onnx_inference_function(Path(args.onnx).read_bytes())), ("int8", int8_inference_function(args.onnx))):
        started = time.perf_counter()
        outputs[name] = np.concatenate([call(x[i : i + 8]) for i in range(0, len(x), 8)])
        results[f"{name}_images_per_s"] = round(len(x) / (time.perf_counter() - started), 1)
    results["int8_vs_fp32"] = agreement(outputs["fp32"], outputs["int8"])
    return results
