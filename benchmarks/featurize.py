"""Featurization benchmark: the project's pipeline against plain Keras and the original notebook.

    .venv/bin/python -m benchmarks.featurize                  # sizes 500, 1000, 2000, 4000
    .venv/bin/python -m benchmarks.featurize --quick          # a smoke run on 200 and 400 images
    .venv/bin/python -m benchmarks.featurize --sizes 1000,2000 --methods baseline,pipeline
    .venv/bin/python -m benchmarks.featurize --sizes 2000,4000,8000 --repeat 2 --no-demo

In one run, on the same machine and the same generated images (`fruit_assets_dev.demo_data`), each method
runs in a fresh process per size while the summed RSS of its whole process tree (driver, JVM, Spark
Python workers) is sampled every 0.2 s:

- baseline: plain single-process Keras, Pillow decode, RGB, resize 224, preprocess_input,
  `model.predict` in batches of 32;
- notebook: the original notebook's code on local Spark (binaryFile, broadcast weights, SCALAR_ITER
  pandas UDF building the model per task, repartition(24), `model.predict`, Parquet write);
- pipeline: the project's whole graph through Dagster `materialize()` on local Spark with the default
  runtime (onnxruntime); then the same graph again in the same process into fresh storage (warm: Spark
  and its Python workers already up);
- pipeline-tensorflow: the same with `FRUIT_MODEL_RUNTIME=tensorflow` (the frozen TensorFlow graph in
  the workers, as before ONNX Runtime);
- demo: `python -m fruit_assets_dev.demo` on the seed-sized set (72 images), timed end to end.

All methods use the same weights: MobileNetV2 `random:0` saved as a legacy .h5 file, loaded as users
load the ImageNet file. The ONNX conversion of those weights is made once before any measurement
(`make-onnx`, into <workdir>/onnx_cache, which the pipeline runs use as FRUIT_MODEL_CACHE): like every
run after a user's first, the measured runs read it from the cache. The steady rate of a method is
the slope of its featurization time over the sizes (least squares over every run, repeats included),
its fixed overhead the intercept; rates between consecutive sizes (median time per size) are shown too.
Results: printed as Markdown and saved as JSON under the work folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
from itertools import pairwise
from pathlib import Path

from benchmarks.common import (
    DEFAULT_WORKDIR,
    SEED_SET,
    ChildFailed,
    image_set,
    loadavg,
    machine_info,
    run_child,
    wait_for_quiet,
    weights_file,
)

METHODS = ("baseline", "notebook", "pipeline", "pipeline-tensorflow")
PIPELINES = ("pipeline", "pipeline-tensorflow")
RUNTIME_OF = {"pipeline": "onnxruntime", "pipeline-tensorflow": "tensorflow"}


def fit(points: list[tuple[int, float]]) -> tuple[float | None, float | None]:
    """Least-squares line t = fixed + n / rate through (n, t): (rate images/s, fixed s)."""
    points = [(n, t) for n, t in points if t is not None]
    if len(points) < 2:
        return None, None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    var = sum((n - mean_n) ** 2 for n, _ in points)
    if var == 0:
        return None, None
    slope = sum((n - mean_n) * (t - mean_t) for n, t in points) / var
    if slope <= 0:
        return None, None
    return 1.0 / slope, mean_t - slope * mean_n


def medians(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """One (n, median time) per size: repeated runs of a size count once."""
    by_size: dict[int, list[float]] = {}
    for n, t in points:
        if t is not None:
            by_size.setdefault(n, []).append(t)
    return sorted((n, statistics.median(ts)) for n, ts in by_size.items())


def segment_rates(points: list[tuple[int, float]]) -> dict[int, float]:
    """Images/s between consecutive sizes: (n2 - n1) / (t2 - t1), keyed by n2."""
    points = medians(points)
    return {n2: round((n2 - n1) / (t2 - t1), 1) for (n1, t1), (n2, t2) in pairwise(points) if t2 > t1}


def measure(args) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    logs = workdir / "logs" / stamp
    weights = weights_file(workdir)
    sizes = sorted(args.sizes)
    sets = {n: image_set(workdir, n) for n in sizes}
    seed_set = image_set(workdir, SEED_SET) if args.demo else None
    report = {"started": stamp, "machine": machine_info(), "sizes": sizes, "methods": args.methods, "runs": []}
    if "pipeline" in args.methods:
        report["onnx_conversion"] = run_child(
            [
                "make-onnx",
                "--weights",
                str(weights),
                "--out",
                str(workdir / "model.onnx"),
                "--reference",
                str(workdir / "micro_reference.npy"),
            ],
            logs / "make-onnx.log",
        )
    if args.wait_quiet:
        report["load_waited_for"] = wait_for_quiet(args.quiet_threshold, args.wait_quiet)
    report["load_before"] = loadavg()
    print(f"# machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, load {report['load_before']}", flush=True)

    for n, repeat in [(n, r) for n in sizes for r in range(args.repeat)]:
        for method in args.methods:
            result = _measure_run(method, n, repeat, sets[n], weights, workdir, logs, args)
            report["runs"].append(result)
            print(f"{method:>9} n={n:>5}: {summary(result)}", flush=True)
    if seed_set is not None:
        result = _measure_demo(seed_set, workdir, logs, args)
        report["runs"].append(result)
        print(f"{'demo':>9} n={SEED_SET:>5}: {summary(result)}", flush=True)
    report["load_after"] = loadavg()
    report["analysis"] = analyse(report)
    out = workdir / f"results-{stamp}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\n# results: {out}  logs: {logs}\n")
    print(markdown(report))
    return report


def _measure_run(method: str, n: int, repeat: int, images: Path, weights: Path, workdir: Path, logs: Path, args) -> dict:
    """One method on one image set in a fresh process; measured again (up to --retries times) when
    other processes took more than --max-foreign of the CPU."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{method}-{n}-", dir=workdir))
    features_file = workdir / f"baseline_features_{n}.npy"
    child = _child_args(method, images, weights, scratch, features_file, args)
    cache_env = {"FRUIT_MODEL_CACHE": str(workdir / "onnx_cache")}  # where make-onnx put the conversion
    for attempt in range(1 + args.retries):
        load = wait_for_quiet(args.quiet_threshold, args.cooldown)  # let the previous run's load decay
        try:
            result = run_child(child, logs / f"{method}-{n}-r{repeat}-{attempt}.log", extra_env=cache_env)
        except ChildFailed as error:
            print(f"!! {error}", file=sys.stderr, flush=True)
            result = {"failed": str(error)}
        result.update({"method": method, "n": n, "repeat": repeat, "load_before": load, "load_after": loadavg(), "attempt": attempt})
        if result.get("foreign_cpu_share", 0) <= args.max_foreign or attempt == args.retries:
            break
        print(f"   ({method} n={n}: {result['foreign_cpu_share']:.0%} of the CPU went to other processes: measuring again)", flush=True)
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
    shutil.rmtree(scratch, ignore_errors=True)
    return result


def _measure_demo(seed_set: Path, workdir: Path, logs: Path, args) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="demo-", dir=workdir))
    load = wait_for_quiet(args.quiet_threshold, args.cooldown)
    try:
        result = run_child(["demo", "--images", str(seed_set), "--scratch", str(scratch)], logs / "demo.log")
    except ChildFailed as error:
        print(f"!! {error}", file=sys.stderr, flush=True)
        result = {"failed": str(error)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result.update({"method": "demo", "n": SEED_SET, "load_before": load, "load_after": loadavg()})
    return result


def _child_args(method: str, images: Path, weights: Path, scratch: Path, features_file: Path, args) -> list[str]:
    child = [
        method if method not in PIPELINES else "pipeline",
        "--images",
        str(images),
        "--weights",
        str(weights),
        "--scratch",
        str(scratch),
    ]
    if method == "baseline":
        child += ["--save-features", str(features_file)]
    if method in PIPELINES:
        child += ["--runtime", RUNTIME_OF[method]] + (["--warm"] if args.warm else [])
        if features_file.exists() and "baseline" in args.methods:
            child += ["--compare-features", str(features_file)]
    return child


def _share(run: dict) -> str:
    share = run.get("foreign_cpu_share")
    return "n/a" if share is None else f"{share:.1%}"


def merge(reports: list[dict]) -> dict:
    merged = dict(reports[0])
    runs = {}
    for report in reports:
        for run in report["runs"]:
            key = (run["method"], run["n"], run.get("repeat", 0))
            if "failed" not in run or key not in runs:
                runs[key] = run
    order = {m: i for i, m in enumerate(METHODS + ("demo",))}
    merged["methods"] = sorted({m for report in reports for m in report["methods"]}, key=lambda m: order.get(m, 9))
    merged["runs"] = sorted(runs.values(), key=lambda r: (r["method"] == "demo", r["n"], r.get("repeat", 0), order.get(r["method"], 9)))
    merged["load_before"] = " / ".join(r["load_before"] for r in reports)
    merged["load_after"] = " / ".join(r["load_after"] for r in reports)
    merged["analysis"] = analyse(merged)
    return merged


def summary(result: dict) -> str:
    if "failed" in result:
        return "FAILED"
    text = (
        f"total {result.get('process_wall_s')} s, featurize {result.get('featurize_s')} s, peak RSS {result['peak_rss_mb']} MB, "
        f"load before {result['load_before']}, foreign CPU {result['foreign_cpu_share']:.1%}"
    )
    if result.get("runs") and len(result["runs"]) > 1:
        text += f", warm image_features {result['runs'][1]['steps_s'].get('image_features')} s"
    if result.get("in_run_steady_images_per_s"):
        text += f", in-run steady {result['in_run_steady_images_per_s']}/s"
    if "max_abs_diff_vs_baseline" in (result.get("runs") or [{}])[0]:
        text += f", max |pipeline - baseline| {result['runs'][0]['max_abs_diff_vs_baseline']:.2e}"
    return text


def _points(report, method, key) -> list[tuple[int, float]]:
    return [(r["n"], key(r)) for r in report["runs"] if r["method"] == method and "failed" not in r]


def _pipeline_keys() -> dict:
    return {
        "featurize": lambda r: r["runs"][0]["steps_s"].get("image_features"),
        "featurize_warm": lambda r: r["runs"][1]["steps_s"].get("image_features") if len(r["runs"]) > 1 else None,
        "graph": lambda r: r["runs"][0]["materialize_s"],
        "process": lambda r: r["process_wall_s"] if len(r["runs"]) == 1 else r["total_s"],
    }


def _fits(report: dict) -> dict:
    keys = {
        "baseline": {"featurize": lambda r: r["featurize_s"], "process": lambda r: r["process_wall_s"]},
        "notebook": {"featurize": lambda r: r["featurize_s"], "process": lambda r: r["process_wall_s"]},
        **{method: _pipeline_keys() for method in PIPELINES},
    }
    analysis = {}
    for method, measures in keys.items():
        for name, key in measures.items():
            points = _points(report, method, key)
            rate, fixed = fit(points)
            if rate is None:
                continue
            analysis[f"{method}.{name}"] = {
                "steady_images_per_s": round(rate, 1),
                "fixed_s": round(fixed, 1),
                "segment_images_per_s": segment_rates(points),
                "images_per_s_by_size": {n: round(n / t, 1) for n, t in medians(points) if t},
            }
    return analysis


def _ratio(analysis: dict, top: str, bottom: str) -> dict:
    """Steady rate of `top` over `bottom` (slopes), and the same between sizes."""
    if top not in analysis or bottom not in analysis:
        return {}
    a, b = analysis[top], analysis[bottom]
    by_segment = {
        n: round(rate / b["segment_images_per_s"][n], 2) for n, rate in a["segment_images_per_s"].items() if n in b["segment_images_per_s"]
    }
    return {
        f"ratio {top} / {bottom}": round(a["steady_images_per_s"] / b["steady_images_per_s"], 2),
        f"ratio {top} / {bottom} by segment": by_segment,
    }


def _worker_memory(report: dict) -> dict:
    """Peak RSS of all Spark Python workers together, per method (largest over its runs), in MB."""
    peaks = {}
    for run in report["runs"]:
        if "failed" not in run and run["method"] != "demo":
            workers = run["peak_rss_mb_by_kind"].get("python_workers", 0)
            peaks[run["method"]] = max(peaks.get(run["method"], 0), workers)
    return peaks


def analyse(report: dict) -> dict:
    analysis = _fits(report)
    pairs = [(f"{m}.featurize", "baseline.featurize") for m in PIPELINES + ("notebook",)]
    pairs += [
        ("pipeline.featurize_warm", "baseline.featurize"),
        ("pipeline.featurize", "pipeline-tensorflow.featurize"),
        ("pipeline.featurize_warm", "pipeline-tensorflow.featurize_warm"),
        ("pipeline.featurize", "notebook.featurize"),
        ("pipeline-tensorflow.featurize", "notebook.featurize"),
    ]
    for top, bottom in pairs:
        analysis.update(_ratio(analysis, top, bottom))
    for method in PIPELINES:
        if method in report["methods"] and "notebook" in report["methods"]:
            pipeline = dict(medians(_points(report, method, _pipeline_keys()["process"])))
            notebook = dict(medians(_points(report, "notebook", lambda r: r["process_wall_s"])))
            analysis[f"ratio notebook.process / {method}.process by size (time)"] = {
                n: round(notebook[n] / pipeline[n], 2) for n in pipeline if n in notebook
            }
    memory = _worker_memory(report)
    analysis["peak Python workers RSS MB by method"] = memory
    if memory.get("pipeline-tensorflow") and "pipeline" in memory:
        analysis["ratio pipeline / pipeline-tensorflow Python workers peak RSS"] = round(
            memory["pipeline"] / memory["pipeline-tensorflow"], 2
        )
    return analysis


def goals(analysis: dict) -> list[str]:
    """The issue's goals, checked on this run's figures."""

    def check(name: str, value, ok) -> str:
        return f"- {name}: {value if value is not None else 'not measured'} -> {'MET' if value is not None and ok(value) else 'NOT MET'}"

    return [
        check(
            "default runtime / tensorflow runtime, steady featurization (goal >= 1.4)",
            analysis.get("ratio pipeline.featurize / pipeline-tensorflow.featurize"),
            lambda v: v >= 1.4,
        ),
        check(
            "default runtime / notebook, steady featurization (goal >= 2)",
            analysis.get("ratio pipeline.featurize / notebook.featurize"),
            lambda v: v >= 2,
        ),
        check(
            "Python workers peak RSS, default / tensorflow runtime (goal <= 0.5)",
            analysis.get("ratio pipeline / pipeline-tensorflow Python workers peak RSS"),
            lambda v: v <= 0.5,
        ),
    ]


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, {m['java']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"CPU vector flags: {m.get('vector_flags', 'unknown')}",
        f"Load (1, 5, 15 min) before: {report['load_before']}, after: {report['load_after']}",
        "",
        "| method | images | process wall s | featurize s | images/s (featurize) | warm image_features s | peak RSS MB (driver / JVM / workers) | load before | foreign CPU |",  # noqa: E501 - a Markdown table row
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in report["runs"]:
        if "failed" in r:
            lines.append(f"| {r['method']} | {r['n']} | FAILED | | | | | {r['load_before']} |")
            continue
        if r["method"] in PIPELINES:
            featurize = r["runs"][0]["steps_s"].get("image_features")
            warm = r["runs"][1]["steps_s"].get("image_features") if len(r["runs"]) > 1 else None
            wall = r["total_s"] if len(r["runs"]) > 1 else r["process_wall_s"]
        else:
            featurize, warm, wall = r.get("featurize_s"), None, r["process_wall_s"]
        kinds = r["peak_rss_mb_by_kind"]
        mem = f"{r['peak_rss_mb']} ({kinds.get('driver', 0)} / {kinds.get('jvm', 0)} / {kinds.get('python_workers', 0)})"
        rate = f"{r['n'] / featurize:.1f}" if featurize else ""
        lines.append(
            f"| {r['method']} | {r['n']} | {wall:.1f} | {featurize if featurize is not None else ''} | {rate} | {warm or ''} | {mem} | {r['load_before']} | {_share(r)} |"  # noqa: E501 - a Markdown table row
        )
    lines += ["", "| measure | steady images/s (slope) | fixed s (intercept) | images/s between sizes |", "| --- | ---: | ---: | --- |"]
    for name, value in report["analysis"].items():
        if isinstance(value, dict) and "steady_images_per_s" in value:
            segments = ", ".join(f"->{n}: {v}" for n, v in value["segment_images_per_s"].items())
            lines.append(f"| {name} | {value['steady_images_per_s']} | {value['fixed_s']} | {segments} |")
    lines.append("")
    for name, value in report["analysis"].items():
        if name.startswith(("ratio", "peak")):
            lines.append(f"- {name}: {value}")
    conversion = report.get("onnx_conversion")
    if conversion:
        lines.append(
            f"- ONNX conversion before the runs (make-onnx): converted now {conversion.get('converted_now')}, "
            f"{conversion.get('process_wall_s')} s process, max abs diff vs Keras {conversion['info']['max_abs_diff_vs_keras']:.1e}"
        )
    lines += ["", "Goals:"] + goals(report["analysis"])
    return "\n".join(lines)


def _terminate_on_sigterm() -> None:
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt  # run_child then stops the measured process tree

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.featurize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,1000,2000,4000", help="comma-separated image counts (multiples of 20)")
    parser.add_argument("--repeat", type=int, default=1, help="measure each method and size this many times")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 and 400 images (overrides --sizes)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--no-warm", dest="warm", action="store_false", help="pipeline: skip the warm second run")
    parser.add_argument("--no-demo", dest="demo", action="store_false", help="skip the seed-sized demo run")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="image sets, weights, logs, results")
    parser.add_argument("--wait-quiet", type=float, default=0, help="wait up to this many s for load < threshold")
    parser.add_argument("--quiet-threshold", type=float, default=0.5)
    parser.add_argument(
        "--max-foreign", type=float, default=0.1, help="measure again when other processes took more than this share of the CPU"
    )
    parser.add_argument("--retries", type=int, default=2, help="at most this many re-measurements per run")
    parser.add_argument(
        "--cooldown", type=float, default=120, help="before each run, wait up to this many s for the 1-min load to drop below the threshold"
    )
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="RESULTS_JSON",
        help="measure nothing: merge these result files (a later run of the same method, size and repeat "
        "replaces an earlier one) and print the analysis",
    )
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(merge([json.loads(Path(f).read_text()) for f in args.report])))
        return 0
    args.sizes = [200, 400] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    if args.quick:
        args.cooldown, args.retries = 0, 0  # a smoke run: no waiting, no re-measuring
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    _terminate_on_sigterm()
    measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
