"""The measured programs, each run in a fresh process by the orchestrators (`benchmarks.featurize`,
`benchmarks.levers`): `python -m benchmarks.methods <method> ... --json OUT`.

- `baseline`:  plain single-process Keras (Pillow, preprocess_input, model.predict in batches of 32).
- `notebook`:  the original Databricks-style notebook on local Spark (binaryFile, broadcast weights,
               SCALAR_ITER pandas UDF building the model per task, repartition(24), Parquet write).
- `pipeline`:  the project's graph through Dagster `materialize()`, as users run it.
- `featurize`: the project's `featurize()` alone on a Spark session with explicit settings (levers).
- `micro-model`, `micro-decode`: single-process measurements of the model call and of decoding
  (`make-onnx` converts the model once for them and saves Keras' reference output).
- `quant-check`: ONNX Runtime dynamic int8 against fp32 on real images (`benchmarks/quantized.py`).

Every method reports its phases in seconds, measured from the start of this process (`t0`), so that
imports, Spark start-up and model set-up are visible separately from the steady work.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402


def since_start() -> float:
    return round(time.perf_counter() - T0, 3)


def image_paths(root: str) -> list[str]:
    return sorted(str(p) for p in Path(root).glob("*/*.jpg"))


# ----------------------------------------------------------------------------------------- weights


def make_weights(args) -> dict:
    import h5py
    from keras.src.legacy.saving import legacy_h5_format  # the format of the keras.applications files

    from fruit_assets.ml.model import build_feature_extractor, parse_weights_setting

    model = build_feature_extractor(parse_weights_setting("random:0"))
    with h5py.File(args.out, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return {"weights": args.out}


# ---------------------------------------------------------------------------------------- baseline


def baseline(args) -> dict:
    """Plain single-process Keras: what one would write without Spark."""
    import numpy as np
    from PIL import Image

    paths = image_paths(args.images)
    imported_at = since_start()
    import keras
    from keras.applications.mobilenet_v2 import preprocess_input

    tf_imported_at = since_start()
    model = keras.applications.MobileNetV2(include_top=False, pooling="avg", input_shape=(224, 224, 3), weights=args.weights)
    model_built_at = since_start()

    def load(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR))

    features, batch_ends = [], []
    for start in range(0, len(paths), args.batch_size):
        batch = np.stack([load(p) for p in paths[start : start + args.batch_size]]).astype(np.float32)
        features.append(model.predict(preprocess_input(batch), batch_size=args.batch_size, verbose=0))
        batch_ends.append(since_start())
    done_at = since_start()
    features = np.concatenate(features)
    if args.save_features:
        np.save(args.save_features, features)
    n = len(paths)
    first = batch_ends[0] - model_built_at
    steady_s = done_at - batch_ends[0]
    return {
        "images": n,
        "phases": {
            "python_imports": imported_at,
            "tf_import": round(tf_imported_at - imported_at, 3),
            "model_build": round(model_built_at - tf_imported_at, 3),
            "first_batch": round(first, 3),
            "rest": round(steady_s, 3),
        },
        "fixed_s": round(batch_ends[0] - (args.batch_size / (n - args.batch_size)) * steady_s if n > args.batch_size else batch_ends[0], 3),
        "featurize_s": round(done_at - model_built_at, 3),
        "total_s": done_at,
        "in_run_steady_images_per_s": round((n - args.batch_size) / steady_s, 2) if n > args.batch_size else None,
    }


# ---------------------------------------------------------------------------------------- notebook


def notebook(args) -> dict:
    """The original notebook's code, written as the Databricks "Featurization for transfer learning"
    notebook (and the course notebooks derived from it) do it, on local Spark. Only the preprocessing is
    corrected for MobileNetV2 (RGB, mobilenet_v2.preprocess_input) and the weights come from the file."""
    import io

    import numpy as np
    import pandas as pd
    from PIL import Image
    from pyspark.sql import SparkSession
    from pyspark.sql.functions import PandasUDFType, col, element_at, pandas_udf, split

    imported_at = since_start()
    spark = (
        SparkSession.builder.appName("P8-notebook")
        .master(args.master)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    sc = spark.sparkContext
    sc.setLogLevel("ERROR")
    spark_at = since_start()

    images = spark.read.format("binaryFile").option("pathGlobFilter", "*.jpg").option("recursiveFileLookup", "true").load(args.images)
    images = images.withColumn("label", element_at(split(images["path"], "/"), -2))

    from tensorflow.keras.applications.mobilenet_v2 import MobileNetV2, preprocess_input
    from tensorflow.keras.preprocessing.image import img_to_array

    tf_imported_at = since_start()
    model = MobileNetV2(weights=args.weights, include_top=False, pooling="avg", input_shape=(224, 224, 3))
    brodcast_weights = sc.broadcast(model.get_weights())
    driver_model_at = since_start()

    def model_fn():
        """Returns a MobileNetV2 model without its top layer, with the broadcast weights."""
        model = MobileNetV2(weights=None, include_top=False, pooling="avg", input_shape=(224, 224, 3))
        model.set_weights(brodcast_weights.value)
        return model

    def preprocess(content):
        """Preprocesses raw image bytes for prediction."""
        img = Image.open(io.BytesIO(content)).convert("RGB").resize([224, 224])
        arr = img_to_array(img)
        return preprocess_input(arr)

    def featurize_series(model, content_series):
        """Featurize a pd.Series of raw images using the input model.
        :return: a pd.Series of image features
        """
        input = np.stack(content_series.map(preprocess))
        preds = model.predict(input)
        # For some layers, output features will be multi-dimensional tensors.
        # We flatten the feature tensors to vectors for easier storage in Spark DataFrames.
        output = [p.flatten() for p in preds]
        return pd.Series(output)

    @pandas_udf("array<float>", PandasUDFType.SCALAR_ITER)
    def featurize_udf(content_series_iter):
        """This method is a Scalar Iterator pandas UDF wrapping our featurization function.
        The decorator specifies that this returns a Spark DataFrame column of type ArrayType(FloatType).

        :param content_series_iter: This argument is an iterator over batches of data, where each batch
                                    is a pandas Series of image data.
        """
        # With Scalar Iterator pandas UDFs, we can load the model once and then re-use it
        # for multiple data batches.  This amortizes the overhead of loading big models.
        model = model_fn()
        for content_series in content_series_iter:
            yield featurize_series(model, content_series)

    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "1024")
    features_df = images.repartition(24).select(col("path"), col("label"), featurize_udf("content").alias("features"))
    out = os.path.join(args.scratch, "notebook_features")
    features_df.write.mode("overwrite").parquet(out)
    done_at = since_start()
    rows = spark.read.parquet(out).count()
    spark.stop()
    return {
        "images": rows,
        "phases": {
            "python_imports": imported_at,
            "spark_start": round(spark_at - imported_at, 3),
            "driver_tf_import": round(tf_imported_at - spark_at, 3),
            "driver_model_and_broadcast": round(driver_model_at - tf_imported_at, 3),
            "udf_and_write": round(done_at - driver_model_at, 3),
        },
        "featurize_s": round(done_at - driver_model_at, 3),
        "total_s": done_at,
    }


# ---------------------------------------------------------------------------------------- pipeline


def _step_seconds(instance, result) -> dict:
    """Duration of each step of a Dagster run, from the instance's step statistics."""
    return {
        stats.step_key: round(stats.end_time - stats.start_time, 3)
        for stats in instance.get_run_step_stats(result.run_id)
        if stats.start_time and stats.end_time
    }


def pipeline(args) -> dict:
    """The project's whole graph through Dagster's `materialize()`, on local Spark, as users run it
    (FRUIT_* settings, build_resources()). With --warm, the graph is materialized a second time in the
    same process into fresh storage: Spark and its Python workers (with their model) are then warm."""
    os.environ["FRUIT_IMAGES_URI"] = args.images
    os.environ["FRUIT_MODEL_WEIGHTS"] = args.weights
    if args.runtime:
        os.environ["FRUIT_MODEL_RUNTIME"] = args.runtime
    if args.master:
        os.environ["FRUIT_SPARK_MASTER"] = args.master
    # Imported here, before `imported_at`: the imports are a phase of their own, not part of materialize.
    from dagster import materialize  # noqa: F401

    from fruit_assets.definitions import all_assets_and_checks  # noqa: F401
    from fruit_assets.resources import build_resources  # noqa: F401

    imported_at = since_start()
    runs = [_materialize_once(args, run) for run in range(2 if args.warm else 1)]
    cold = runs[0]
    if args.compare_features:
        import numpy as np
        from deltalake import DeltaTable

        stored = DeltaTable(os.path.join(args.scratch, "assets_0", "image_features")).to_pandas().sort_values("path")
        reference = np.load(args.compare_features)
        cold["max_abs_diff_vs_baseline"] = float(np.abs(np.stack(stored.features) - reference).max())
    return {
        "images": cold["rows"],
        "phases": {
            "python_imports": imported_at,
            "materialize": cold["materialize_s"],
            **{f"step:{k}": v for k, v in cold["steps_s"].items()},
        },
        "featurize_s": cold["steps_s"].get("image_features"),
        "total_s": since_start() if not args.warm else round(imported_at + cold["materialize_s"], 3),
        "runs": runs,
    }


def _materialize_once(args, run: int) -> dict:
    from dagster import DagsterInstance, materialize

    from fruit_assets.definitions import all_assets_and_checks
    from fruit_assets.resources import build_resources

    os.environ["FRUIT_STORAGE_URI"] = os.path.join(args.scratch, f"assets_{run}")
    resources = build_resources()
    if args.spark_conf:
        resources["pyspark"] = _pyspark_resource(json.loads(args.spark_conf))
    started = since_start()
    instance = DagsterInstance.ephemeral()
    result = materialize(all_assets_and_checks, resources=resources, selection=args.selection, instance=instance)
    ended = since_start()
    assert result.success
    metadata = {
        event.asset_key.to_user_string(): {k: v.value for k, v in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }
    features = metadata["image_features"]
    return {
        "materialize_s": round(ended - started, 3),
        "steps_s": _step_seconds(instance, result),
        "image_features_featurize_s": features["featurize_seconds"],
        "image_features_model_setup_s": features["model_setup_seconds"],
        "image_features_throughput": features["throughput_images_per_s"],
        "runtime": features["runtime"],
        "onnx_converted_now": features.get("onnx_converted_now"),
        "rows": features["rows"],
        "skipped": features["skipped"],
    }


def _pyspark_resource(extra: dict):
    from dagster_pyspark import PySparkResource

    from fruit_assets.resources import local_spark_config

    return PySparkResource(spark_config=local_spark_config() | extra)


def demo(args) -> dict:
    """`python -m fruit_assets_dev.demo` as a user runs it after installation (FRUIT_MODEL_WEIGHTS unset:
    it tries ImageNet, cannot download it here and falls back to random:0), on the seed-sized set."""
    os.environ["FRUIT_IMAGES_URI"] = args.images
    os.environ["FRUIT_STORAGE_URI"] = os.path.join(args.scratch, "demo_assets")
    from fruit_assets_dev import demo as demo_module

    code = demo_module.main([])
    assert code == 0
    return {"images": len(image_paths(args.images)), "total_s": since_start(), "featurize_s": None}


# --------------------------------------------------------------------------------------- featurize


def featurize_only(args) -> dict:
    """`featurize()` alone (no Dagster) on a Spark session with explicit conf and settings: for levers.
    Runs the featurization `repeat` times; the first run is cold (workers start, load the runtime, build
    the model), the later ones warm. The driver prepares the model (ONNX conversion, cached) first."""
    from fruit_assets.resources import local_spark_config

    conf = local_spark_config() | {"spark.ui.enabled": "false"} | json.loads(args.spark_conf or "{}")
    settings_kwargs = json.loads(args.settings or "{}")
    from pyspark.sql import SparkSession

    imported_at = since_start()
    builder = SparkSession.builder
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    spark_at = since_start()

    from fruit_assets.ml import featurize as featurize_module
    from fruit_assets.ml.model import feature_extractor_weights, parse_weights_setting, weights_fingerprint
    from fruit_assets.pipeline.listing import list_images
    from fruit_assets.storage import resolve

    weights = feature_extractor_weights(parse_weights_setting(args.weights))
    key = weights_fingerprint(weights)
    settings = featurize_module.FeaturizeSettings(**settings_kwargs)
    payload, runtime = featurize_module.prepare_model(weights, key, settings)
    catalog = list_images(resolve(args.images)).catalog()
    frame = spark.createDataFrame(catalog[["path", "label"]])
    partitions = args.partitions or featurize_module.default_partitions(spark, len(catalog))
    setup_at = since_start()
    runs = _featurize_runs(featurize_module, frame, payload, key, settings, partitions, args.repeat, len(catalog))
    spark.stop()
    return {
        "images": len(catalog),
        "phases": {
            "python_imports": imported_at,
            "spark_start": round(spark_at - imported_at, 3),
            "driver_setup": round(setup_at - spark_at, 3),
        },
        "runs_s": runs,
        "featurize_s": runs[0],
        "partitions": partitions,
        "settings": settings_kwargs,
        "runtime": runtime,
        "spark_conf": json.loads(args.spark_conf or "{}"),
        "total_s": since_start(),
    }


def _featurize_runs(featurize_module, frame, payload, key, settings, partitions, repeat, expected) -> list[float]:
    from pyspark.sql import functions as F

    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        out = featurize_module.featurize(frame, payload, key, settings, partitions)
        stats = out.agg(F.count("features").alias("ok"), F.sum(F.size("features")).alias("floats")).first()
        runs.append(round(time.perf_counter() - started, 3))
        assert stats["ok"] == expected, stats
    return runs


# ------------------------------------------------------------------------------------------- micro


MICRO_BATCH = 64  # the reference input: uniform random, seed 0; a batch of b images is its first b


def micro_input(batch: int):
    import numpy as np

    return np.random.default_rng(0).uniform(-1, 1, (MICRO_BATCH, 224, 224, 3)).astype(np.float32)[:batch]


def make_onnx(args) -> dict:
    """Driver side, once: the ONNX model of the weights file (the package's conversion, cached), and
    Keras' model(x, training=False) on the micro input as the reference every micro mode is held to."""
    import keras
    import numpy as np

    from fruit_assets.ml.model import weights_fingerprint
    from fruit_assets.ml.onnx_model import converted_model

    model = keras.applications.MobileNetV2(include_top=False, pooling="avg", input_shape=(224, 224, 3), weights=args.weights)
    weights = model.get_weights()
    converted = converted_model(weights, weights_fingerprint(weights), Path(args.out).parent / "onnx_cache")
    Path(args.out).write_bytes(converted.data)
    np.save(args.reference, np.asarray(model(micro_input(MICRO_BATCH), training=False)))
    return {"onnx": args.out, "reference": args.reference, "converted_now": converted.converted, "info": converted.info}


def _micro_call(args):
    """The inference function of `args.mode`: ONNX modes import onnxruntime only (the child's RSS is
    the runtime's), TensorFlow modes import TensorFlow."""
    if args.mode == "onnxruntime":
        from fruit_assets.ml.onnx_model import onnx_inference_function

        return onnx_inference_function(Path(args.onnx).read_bytes(), args.threads, args.inter_threads, args.spinning)
    if args.mode == "onnxruntime-int8":
        from benchmarks.quantized import int8_inference_function

        return int8_inference_function(args.onnx, args.threads)
    from benchmarks.inference_modes import tensorflow_mode
    from fruit_assets.ml.model import configure_tensorflow_threads, feature_extractor_from_weights

    configure_tensorflow_threads(args.threads, args.inter_threads)
    import keras

    keras_model = keras.applications.MobileNetV2(include_top=False, pooling="avg", input_shape=(224, 224, 3), weights=args.weights)
    return tensorflow_mode(feature_extractor_from_weights(keras_model.get_weights()), args.mode, args.threads)


def micro_model(args) -> dict:
    """The model call alone in one process: `mode` x threads x batch size, on the fixed random input,
    compared with Keras' model(x) on it (`make-onnx` saved that reference)."""
    import numpy as np

    started = time.perf_counter()
    call = _micro_call(args)
    x = micro_input(args.batch_size)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    first = np.asarray(call(x))
    first_s = time.perf_counter() - started
    times = []
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline or len(times) < 3:
        started = time.perf_counter()
        np.asarray(call(x))
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    reference = np.load(args.reference)[: args.batch_size]
    return {
        "mode": args.mode,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "spinning": args.spinning,
        "load_s": round(load_s, 3),
        "first_call_s": round(first_s, 3),
        "median_batch_s": round(median, 4),
        "images_per_s": round(args.batch_size / median, 2),
        "calls": len(times),
        "wall_measured_s": round(sum(times), 2),
        "max_abs_diff_vs_keras": float(np.abs(first - reference).max()),
    }


def micro_decode(args) -> dict:
    """Reading + decoding + resizing + preprocessing per image, with and without JPEG draft mode, and
    (with --weights) how much draft mode changes the features."""
    import io

    import numpy as np
    from PIL import Image

    from fruit_assets.ml.images import decode_image
    from fruit_assets.ml.spec import scale_to_unit_range as preprocess
    from fruit_assets.storage import read_bytes

    paths = image_paths(args.images)[: args.limit]
    out = {"images": len(paths)}

    def timed(fn, repeat=3):
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - started)
        return round(best / len(paths) * 1000, 4)  # ms per image

    def decode(data, draft, factor=1):
        with Image.open(io.BytesIO(data)) as image:
            if draft:
                # JPEG DCT scaling: decodes at 1/2, 1/4 or 1/8 size, never below the size asked for.
                image.draft("RGB", (224 * factor, 224 * factor))
            return np.array(image.convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), dtype=np.uint8)

    blobs = [read_bytes(p) for p in paths]
    out["read_bytes_pyarrow_ms"] = timed(lambda: [read_bytes(p) for p in paths])
    out["read_bytes_open_ms"] = timed(lambda: [Path(p).read_bytes() for p in paths])
    out["decode_image_ms"] = timed(lambda: [decode_image(b) for b in blobs])
    out["decode_plain_ms"] = timed(lambda: [decode(b, False) for b in blobs])
    out["decode_draft_ms"] = timed(lambda: [decode(b, True) for b in blobs])
    out["decode_draft2x_ms"] = timed(lambda: [decode(b, True, 2) for b in blobs])
    plain = np.stack([decode(b, False) for b in blobs])
    drafted = np.stack([decode(b, True) for b in blobs])
    drafted2 = np.stack([decode(b, True, 2) for b in blobs])
    out["preprocess_ms"] = timed(lambda: preprocess(plain))
    out["max_pixel_diff_draft"] = int(np.abs(plain.astype(int) - drafted.astype(int)).max())
    out["mean_pixel_diff_draft"] = round(float(np.abs(plain.astype(int) - drafted.astype(int)).mean()), 3)
    out["image_sizes"] = sorted({Image.open(io.BytesIO(b)).size for b in blobs[:20]})
    if args.weights:
        import keras

        model = keras.applications.MobileNetV2(include_top=False, pooling="avg", input_shape=(224, 224, 3), weights=args.weights)
        a = model.predict(preprocess(plain), batch_size=32, verbose=0)
        b = model.predict(preprocess(drafted), batch_size=32, verbose=0)
        cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        out["feature_max_abs_diff_draft"] = float(np.abs(a - b).max())
        out["feature_mean_abs"] = float(np.abs(a).mean())
        out["feature_relative_l2_diff_draft_max"] = float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)).max())
        out["feature_min_cosine_draft"] = float(cosine.min())
        c = model.predict(preprocess(drafted2), batch_size=32, verbose=0)
        out["feature_max_abs_diff_draft2x"] = float(np.abs(a - c).max())
        out["feature_relative_l2_diff_draft2x_max"] = float((np.linalg.norm(a - c, axis=1) / np.linalg.norm(a, axis=1)).max())
        out["max_pixel_diff_draft2x"] = int(np.abs(plain.astype(int) - drafted2.astype(int)).max())
    return out


def _quant_check(args) -> dict:
    from benchmarks.quantized import quant_check

    return quant_check(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.methods")
    parser.add_argument(
        "method",
        choices=[
            "make-weights",
            "make-onnx",
            "baseline",
            "notebook",
            "pipeline",
            "demo",
            "featurize",
            "micro-model",
            "micro-decode",
            "quant-check",
        ],
    )
    parser.add_argument("--json")
    parser.add_argument("--out")
    parser.add_argument("--images")
    parser.add_argument("--weights")
    parser.add_argument("--scratch")
    parser.add_argument("--master", default="")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--save-features")
    parser.add_argument("--compare-features")
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--selection", nargs="*", default=None)
    parser.add_argument("--spark-conf")
    parser.add_argument("--settings")
    parser.add_argument("--partitions", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--mode", default="call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--inter-threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--runtime", default="", help="pipeline: FRUIT_MODEL_RUNTIME (default: the package's default)")
    parser.add_argument("--onnx", help="micro-model, quant-check: the converted model file (make-onnx)")
    parser.add_argument("--reference", help="make-onnx writes, micro-model reads: Keras' output on the micro input")
    parser.add_argument("--spinning", action="store_true", help="micro-model onnxruntime: allow thread spinning")
    args = parser.parse_args(argv)
    if args.method == "notebook" and not args.master:
        args.master = "local[*]"
    handler = {
        "make-weights": make_weights,
        "make-onnx": make_onnx,
        "quant-check": _quant_check,
        "baseline": baseline,
        "notebook": notebook,
        "pipeline": pipeline,
        "demo": demo,
        "featurize": featurize_only,
        "micro-model": micro_model,
        "micro-decode": micro_decode,
    }[args.method]
    result = handler(args)
    result["method"] = args.method
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    else:
        print(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
