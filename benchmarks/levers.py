"""The levers of the featurization, each measured on its own: `python -m benchmarks.levers`.

    .venv/bin/python -m benchmarks.levers                      # everything, 1,000 images
    .venv/bin/python -m benchmarks.levers --images 2000 --only default,call-inline,threads-2x2
    .venv/bin/python -m benchmarks.levers --micro              # model call and decoding only

Spark levers run the project's `featurize()` (no Dagster) in a fresh process per configuration, twice
on the same Spark session: the first run is cold (Python workers start, import TensorFlow, build and
trace the model), the second warm (workers and their model reused), so warm images/s is the steady
rate of that configuration. Micro levers time the model call alone in one process (inference mode x
TensorFlow threads x batch size) and the decoding of one image (with and without JPEG draft mode).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import DEFAULT_WORKDIR, ChildFailed, image_set, loadavg, machine_info, run_child, wait_for_quiet, weights_file

# name: (FeaturizeSettings overrides, Spark conf overrides, partitions (0 = default), what it tests)
SPARK_LEVERS: dict[str, tuple[dict, dict, int, str]] = {
    "default": ({}, {}, 0, "defaults: local[*], 2 partitions, 1 TF thread, frozen graph, batch 8, files read 2 batches ahead, decode inline"),
    "before": ({"inference": "call", "read_ahead": 0}, {}, 0, "as before this work: eager model(x), everything inline"),
    "call": ({"inference": "call"}, {}, 0, "eager model(x, training=False) instead of tf.function"),
    "predict_on_batch": ({"inference": "predict_on_batch"}, {}, 0, "Keras predict_on_batch"),
    "predict": ({"inference": "predict"}, {}, 0, "Keras predict (per Arrow/model batch)"),
    "function": ({"inference": "function"}, {}, 0, "tf.function graph, weights as variables (not frozen)"),
    "no-read-ahead": ({"read_ahead": 0}, {}, 0, "no background thread: read, decode, infer in turn"),
    "decode-ahead": ({"decode_ahead": True, "io_threads": 1}, {}, 0, "a background thread reads AND decodes 2 batches ahead"),
    "batch-32": ({"batch_size": 32}, {}, 0, "32 images per model call (the default before batch 8 was measured)"),
    "batch-16": ({"batch_size": 16}, {}, 0, "16 images per model call"),
    "batch-64": ({"batch_size": 64}, {}, 0, "64 images per model call"),
    "threads-2x2": ({"tf_intra_op_threads": 2}, {}, 0, "2 workers x 2 TF threads (oversubscribed)"),
    "threads-1x2-taskcpus": ({"tf_intra_op_threads": 2}, {"spark.task.cpus": "2"}, 0, "1 worker at a time x 2 TF threads (spark.task.cpus=2)"),
    "threads-1x2-local1": ({"tf_intra_op_threads": 2}, {"spark.master": "local[1]"}, 1, "local[1], 1 partition, 2 TF threads"),
    "partitions-4": ({}, {}, 4, "4 partitions on 2 cores"),
    "partitions-8": ({}, {}, 8, "8 partitions on 2 cores"),
    "partitions-24": ({}, {}, 24, "24 partitions on 2 cores (the notebook's repartition(24))"),
    "arrow-64": ({}, {"spark.sql.execution.arrow.maxRecordsPerBatch": "64"}, 0, "Arrow batches of 64 rows"),
    "arrow-256": ({}, {"spark.sql.execution.arrow.maxRecordsPerBatch": "256"}, 0, "Arrow batches of 256 rows"),
    "no-reuse-8": ({}, {"spark.python.worker.reuse": "false"}, 8, "8 partitions without Python worker reuse"),
    "local-cluster": ({}, {"spark.master": "local-cluster[2,1,3072]", "spark.executor.memory": "2g"}, 2, "2 executor JVMs x 1 core"),
    "driver-memory-1g": ({}, {"spark.driver.memory": "1g"}, 0, "spark.driver.memory 1g instead of 4g (JVM heap cap)"),
}

# (inference mode, TF intra-op threads, batch size)
MICRO_MODEL = [
    ("call", 1, 32), ("call", 2, 32),
    ("function", 1, 32), ("function", 2, 32),
    ("predict_on_batch", 1, 32), ("predict_on_batch", 2, 32),
    ("predict", 1, 32), ("predict", 2, 32),
    ("frozen", 1, 32), ("frozen", 2, 32),
    ("frozen", 1, 8), ("frozen", 1, 16), ("frozen", 1, 64),
    ("function", 1, 16), ("function", 1, 64),
    ("xla", 2, 32),
]


def spark_levers(args, workdir: Path, logs: Path, weights: Path) -> list[dict]:
    images = image_set(workdir, args.images)
    rows = []
    for name, (settings, conf, partitions, what) in SPARK_LEVERS.items():
        if args.only and name not in args.only:
            continue
        scratch = Path(tempfile.mkdtemp(prefix=f"lever-{name}-", dir=workdir))
        trace = scratch / "trace"
        trace.mkdir()
        child = ["featurize", "--images", str(images), "--weights", str(weights), "--repeat", str(args.repeat),
                 "--settings", json.dumps(settings), "--spark-conf", json.dumps(conf), "--partitions", str(partitions)]
        load = wait_for_quiet(0.5, args.cooldown)
        try:
            result = run_child(child, logs / f"lever-{name}.log", extra_env={"FRUIT_FEATURIZE_TRACE": str(trace)})
            result["tasks"] = [json.loads(line) for f in sorted(trace.glob("*.jsonl")) for line in f.read_text().splitlines()]
        except ChildFailed as error:
            print(f"!! {error}", file=sys.stderr, flush=True)
            result = {"failed": str(error)}
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        result.update({"lever": name, "what": what, "load_before": load, "load_after": loadavg()})
        rows.append(result)
        print(lever_line(result, args.images), flush=True)
    return rows


def lever_line(r: dict, n: int) -> str:
    if "failed" in r:
        return f"| {r['lever']} | {r['what']} | FAILED | | | | |"
    cold, *warm = r["runs_s"]
    best_warm = min(warm) if warm else None
    tasks = [t for t in r.get("tasks", []) if t.get("cached_model")]
    waits = sum(t["load_s"] for t in tasks)
    infer = sum(t["infer_s"] + t["first_call_s"] for t in tasks)
    return (
        f"| {r['lever']} | {r['what']} | {cold:.1f} | {best_warm or 0:.1f} | {n / best_warm if best_warm else 0:.1f} | "
        f"{infer:.1f} / {waits:.2f} | {r['peak_rss_mb']} | {r['load_before']} | {r['foreign_cpu_share']:.1%} |"
    )


def micro_levers(args, workdir: Path, logs: Path, weights: Path) -> list[dict]:
    rows = []
    for mode, threads, batch in MICRO_MODEL:
        name = f"{mode}-t{threads}-b{batch}"
        if args.only and name not in args.only and mode not in args.only:
            continue
        load = loadavg()
        try:
            result = run_child(["micro-model", "--weights", str(weights), "--mode", mode, "--threads", str(threads),
                                "--batch-size", str(batch), "--seconds", str(args.micro_seconds)], logs / f"micro-{name}.log")
        except ChildFailed as error:
            print(f"!! {error}", file=sys.stderr, flush=True)
            continue
        result.update({"load_before": load})
        rows.append(result)
        print(f"| {mode} | {threads} | {batch} | {result['first_call_s']} | {result['images_per_s']} | "
              f"{result['max_abs_diff_vs_call']:.1e} | {result['peak_rss_mb']} | {load} |", flush=True)
    for label, n in (("100x100 demo images", 200), ("896x896 upscaled", 200)):
        images = image_set(workdir, n) if label.startswith("100") else large_set(workdir, n)
        try:
            result = run_child(["micro-decode", "--images", str(images), "--weights", str(weights)], logs / f"micro-decode-{n}-{label[:3]}.log")
        except ChildFailed as error:
            print(f"!! {error}", file=sys.stderr, flush=True)
            continue
        result["label"] = label
        rows.append(result)
        print(f"decode {label}: " + json.dumps({k: v for k, v in result.items() if k.endswith(("_ms", "diff", "diff_draft", "sizes"))}), flush=True)
    return rows


def large_set(workdir: Path, n: int) -> Path:
    """The n-image demo set upscaled to 896x896 JPEGs (like camera photos, larger than the model input):
    where JPEG draft mode (DCT scaling) can actually decode at reduced size."""
    from PIL import Image

    source = image_set(workdir, n)
    root = workdir / "images" / f"large{n}"
    marker = root / ".complete"
    if not marker.exists():
        for path in sorted(source.glob("*/*.jpg")):
            target = root / path.parent.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as image:
                image.convert("RGB").resize((896, 896), Image.Resampling.BICUBIC).save(target, quality=90)
        marker.write_text("896x896\n")
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.levers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images for the Spark levers (multiple of 20)")
    parser.add_argument("--repeat", type=int, default=2, help="featurizations per Spark session (1 cold + warm ones)")
    parser.add_argument("--only", default="", help="comma-separated lever names (or micro modes)")
    parser.add_argument("--micro", action="store_true", help="only the micro levers")
    parser.add_argument("--no-micro", action="store_true", help="only the Spark levers")
    parser.add_argument("--micro-seconds", type=float, default=10.0)
    parser.add_argument("--cooldown", type=float, default=60, help="wait up to this many s for load < 0.5 before each run")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    from benchmarks.featurize import _terminate_on_sigterm

    _terminate_on_sigterm()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    logs = workdir / "logs" / f"levers-{stamp}"
    weights = weights_file(workdir)
    report = {"started": stamp, "machine": machine_info(), "load_before": loadavg(), "images": args.images}
    print(f"# {report['machine']['cpu']}, {report['machine']['cores']} cores, load {report['load_before']}", flush=True)
    if not args.micro:
        print(f"\n| lever | what | cold s | warm s | warm images/s ({args.images} images) | warm model s / load s (main thread) | peak RSS MB | load before | foreign CPU |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |", flush=True)
        report["spark"] = spark_levers(args, workdir, logs, weights)
    if not args.no_micro:
        print("\n| inference | TF threads | batch | first call s | images/s | max abs diff vs model(x) | peak RSS MB | load before |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
        report["micro"] = micro_levers(args, workdir, logs, weights)
    report["load_after"] = loadavg()
    out = workdir / f"levers-{stamp}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n# results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
