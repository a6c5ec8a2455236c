"""The levers of the featurization, each measured on its own: `python -m benchmarks.levers`.

    .venv/bin/python -m benchmarks.levers                      # everything, 1,000 images
    .venv/bin/python -m benchmarks.levers --images 2000 --only default,tensorflow,ort-threads-2x2
    .venv/bin/python -m benchmarks.levers --micro              # model call and decoding only
    .venv/bin/python -m benchmarks.levers --micro --only onnxruntime,frozen --pairs   # 2 processes side by side

Spark levers run the project's `featurize()` (no Dagster) in a fresh process per configuration, twice
on the same Spark session: the first run is cold (Python workers start, load the runtime and build
the model), the second warm (workers and their model reused), so warm images/s is the steady rate of
that configuration. Micro levers time the model call alone in one process (runtime or TensorFlow
inference mode x threads x batch size; with --pairs, two such processes at once, as Spark runs one
worker per core) and the decoding of one image (with and without JPEG draft mode).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from benchmarks.common import DEFAULT_WORKDIR, ChildFailed, image_set, loadavg, machine_info, run_child, wait_for_quiet, weights_file

# name: (FeaturizeSettings overrides, Spark conf overrides, partitions (0 = default), what it tests)
SPARK_LEVERS: dict[str, tuple[dict, dict, int, str]] = {
    "default": (
        {},
        {},
        0,
        "defaults: onnxruntime, local[*], 2 partitions, 1 intra-op + 1 inter-op thread, spinning off, batch 4, files read 4 batches ahead",
    ),
    "tensorflow": ({"runtime": "tensorflow"}, {}, 0, "runtime tensorflow: frozen TensorFlow graph, otherwise the defaults"),
    "ort-spinning": ({"allow_spinning": True}, {}, 0, "ONNX Runtime threads may spin (busy-wait)"),
    "ort-threads-2x2": ({"intra_op_threads": 2}, {}, 0, "2 workers x 2 intra-op threads, spinning off (oversubscribed)"),
    "ort-threads-2x2-spinning": ({"intra_op_threads": 2, "allow_spinning": True}, {}, 0, "2 workers x 2 intra-op threads, spinning on"),
    "threads-1x2-taskcpus": (
        {"intra_op_threads": 2},
        {"spark.task.cpus": "2"},
        0,
        "1 worker at a time x 2 intra-op threads (spark.task.cpus=2)",
    ),
    "no-read-ahead": ({"read_ahead": 0}, {}, 0, "no background thread: read, decode, infer in turn"),
    "batch-1": ({"batch_size": 1}, {}, 0, "1 image per model call"),
    "batch-8": (
        {"batch_size": 8, "read_ahead": 2},
        {},
        0,
        "8 images per model call, files read 2 batches ahead (the default before ONNX Runtime)",
    ),
    "batch-16": ({"batch_size": 16}, {}, 0, "16 images per model call"),
    "batch-32": ({"batch_size": 32}, {}, 0, "32 images per model call"),
    "partitions-4": ({}, {}, 4, "4 partitions on 2 cores"),
    "arrow-256": ({}, {"spark.sql.execution.arrow.maxRecordsPerBatch": "256"}, 0, "Arrow batches of 256 rows"),
    "no-reuse-8": ({}, {"spark.python.worker.reuse": "false"}, 8, "8 partitions without Python worker reuse"),
}

# (mode, intra-op threads, batch size, spinning): "onnxruntime" and "onnxruntime-int8" run the converted
# model; the others are TensorFlow inference modes (benchmarks/inference_modes.py), "frozen" being the
# package's `tensorflow` runtime.
MICRO_MODEL = [
    ("onnxruntime", 1, 4, False),
    ("onnxruntime", 1, 4, True),
    ("onnxruntime", 2, 4, False),
    ("onnxruntime", 2, 4, True),
    ("onnxruntime", 1, 1, False),
    ("onnxruntime", 1, 2, False),
    ("onnxruntime", 1, 8, False),
    ("onnxruntime", 1, 16, False),
    ("onnxruntime", 1, 32, False),
    ("onnxruntime-int8", 1, 4, False),
    ("frozen", 1, 4, False),
    ("frozen", 1, 8, False),
    ("frozen", 2, 4, False),
    ("frozen", 1, 32, False),
    ("function", 1, 32, False),
    ("predict_on_batch", 1, 32, False),
    ("predict", 1, 32, False),
    ("call", 1, 32, False),
]


def spark_levers(args, workdir: Path, logs: Path, weights: Path) -> list[dict]:
    images = image_set(workdir, args.images)
    rows = []
    for name, (settings, conf, partitions, what) in SPARK_LEVERS.items():
        if args.only and name not in args.only:
            continue
        scratch = Path(tempfile.mkdtemp(prefix=f"lever-{name}-", dir=workdir))
        child = [
            "featurize",
            "--images",
            str(images),
            "--weights",
            str(weights),
            "--repeat",
            str(args.repeat),
            "--settings",
            json.dumps(settings),
            "--spark-conf",
            json.dumps(conf),
            "--partitions",
            str(partitions),
        ]
        load = wait_for_quiet(0.5, args.cooldown)
        try:
            result = run_child(child, logs / f"lever-{name}.log", extra_env={"FRUIT_MODEL_CACHE": str(workdir / "onnx_cache")})
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
        return f"| {r['lever']} | {r['what']} | FAILED | | | | | |"
    cold, *warm = r["runs_s"]
    best_warm = min(warm) if warm else None
    workers = r["peak_rss_mb_by_kind"].get("python_workers", 0)
    return (
        f"| {r['lever']} | {r['what']} | {cold:.1f} | {best_warm or 0:.1f} | {n / best_warm if best_warm else 0:.1f} | "
        f"{r['peak_rss_mb']} ({workers}) | {r['load_before']} | {r['foreign_cpu_share']:.1%} |"
    )


def _micro_child(name, mode, threads, batch, spinning, args, prepared) -> list[str]:
    child = [
        "micro-model",
        "--mode",
        mode,
        "--threads",
        str(threads),
        "--batch-size",
        str(batch),
        "--seconds",
        str(args.micro_seconds),
        "--onnx",
        str(prepared["onnx"]),
        "--reference",
        str(prepared["reference"]),
        "--weights",
        str(prepared["weights"]),
    ]
    return child + (["--spinning"] if spinning else [])


def _run_together(children: list[list[str]], logs: list[Path]) -> list[dict]:
    """Run the children at the same time (as Spark runs one worker per core); results in order."""
    results: list = [None] * len(children)

    def run(i):
        try:
            results[i] = run_child(children[i], logs[i])
        except ChildFailed as error:
            results[i] = {"failed": str(error)}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(children))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def micro_model_levers(args, workdir: Path, logs: Path, weights: Path) -> list[dict]:
    prepared = {"onnx": workdir / "model.onnx", "reference": workdir / "micro_reference.npy", "weights": weights}
    run_child(
        ["make-onnx", "--weights", str(weights), "--out", str(prepared["onnx"]), "--reference", str(prepared["reference"])],
        logs / "make-onnx.log",
    )
    rows, copies = [], 2 if args.pairs else 1
    for mode, threads, batch, spinning in MICRO_MODEL:
        name = f"{mode}-t{threads}-b{batch}" + ("-spin" if spinning else "")
        if args.only and name not in args.only and mode not in args.only:
            continue
        load = wait_for_quiet(0.5, args.cooldown)
        child = _micro_child(name, mode, threads, batch, spinning, args, prepared)
        results = _run_together([child] * copies, [logs / f"micro-{name}-{i}.log" for i in range(copies)])
        if any("failed" in r for r in results):
            print(f"!! {name}: " + " / ".join(r.get("failed", "") for r in results), file=sys.stderr, flush=True)
            continue
        row = {
            "name": name,
            "mode": mode,
            "threads": threads,
            "batch_size": batch,
            "spinning": spinning,
            "processes": copies,
            "load_before": load,
            "results": results,
            "images_per_s": round(sum(r["images_per_s"] for r in results), 1),
        }
        rows.append(row)
        first = results[0]
        print(
            f"| {mode} | {threads} | {batch} | {'on' if spinning else 'off'} | {copies} | {first['load_s']} | "
            f"{' + '.join(str(r['images_per_s']) for r in results)} = {row['images_per_s']} | "
            f"{max(r['max_abs_diff_vs_keras'] for r in results):.1e} | {max(r['peak_rss_mb'] for r in results)} | "
            f"{sum(r['cpu_s'] for r in results):.1f} / {sum(r['wall_measured_s'] for r in results):.1f} | {load} |",
            flush=True,
        )
    return rows


def micro_decode_levers(args, workdir: Path, logs: Path, weights: Path) -> list[dict]:
    rows = []
    for label, n in (("100x100 demo images", 200), ("896x896 upscaled", 200)):
        images = image_set(workdir, n) if label.startswith("100") else large_set(workdir, n)
        try:
            result = run_child(
                ["micro-decode", "--images", str(images), "--weights", str(weights)], logs / f"micro-decode-{n}-{label[:3]}.log"
            )
        except ChildFailed as error:
            print(f"!! {error}", file=sys.stderr, flush=True)
            continue
        result["label"] = label
        rows.append(result)
        print(
            f"decode {label}: " + json.dumps({k: v for k, v in result.items() if k.endswith(("_ms", "diff", "diff_draft", "sizes"))}),
            flush=True,
        )
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
    parser.add_argument("--pairs", action="store_true", help="micro model: two processes at once (Spark's layout on 2 cores)")
    parser.add_argument("--no-decode", action="store_true", help="micro: skip the decoding measurements")
    parser.add_argument("--cooldown", type=float, default=60, help="wait up to this many s for load < 0.5 before each run")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    args = parser.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    from benchmarks.featurize import _terminate_on_sigterm

    _terminate_on_sigterm()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = workdir / "logs" / f"levers-{stamp}"
    weights = weights_file(workdir)
    report = {"started": stamp, "machine": machine_info(), "load_before": loadavg(), "images": args.images}
    print(f"# {report['machine']['cpu']}, {report['machine']['cores']} cores, load {report['load_before']}", flush=True)
    if not args.micro:
        print(
            f"\n| lever | what | cold s | warm s | warm images/s ({args.images} images) | peak RSS MB (Python workers) | load before | foreign CPU |"  # noqa: E501 - a Markdown table row
        )
        print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |", flush=True)
        report["spark"] = spark_levers(args, workdir, logs, weights)
    if not args.no_micro:
        print(
            "\n| mode | intra-op threads | batch | spinning | processes | load s | images/s | max abs diff vs Keras | peak RSS MB | CPU s / measured s | load before |"  # noqa: E501 - a Markdown table row
        )
        print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |", flush=True)
        report["micro"] = micro_model_levers(args, workdir, logs, weights)
        if not args.no_decode:
            report["micro_decode"] = micro_decode_levers(args, workdir, logs, weights)
    report["load_after"] = loadavg()
    out = workdir / f"levers-{stamp}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n# results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
