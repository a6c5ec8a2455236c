"""What an incremental run costs next to a full one, through the CLI, as users run it.

    python -m benchmarks.incremental                     # 20,000 images, then 24 more (~5 min)
    python -m benchmarks.incremental --images 2000 --added 24
    python -m benchmarks.incremental --report FILE.json  # print the table of an earlier run again

In one run on one machine: `dagster asset materialize -m fruit_assets.definitions --select '*'` on a
fresh storage folder and N images (the full run), then the same command after adding a few images
(the incremental run). Each is a fresh process; its wall time, the whole process tree's peak memory
and CPU time, and what each asset's metadata says it did (rows featurized and reused, files and bytes
written, the PCA statistics' mode, seconds per step) are reported. The goal (issue 13): the
incremental run takes at most 20% of the full run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import DEFAULT_WORKDIR, REPO_ROOT, MemorySampler, child_env, image_set, machine_info, wait_for_quiet

ASSETS = ("raw_images", "image_features", "pca_model", "reduced_features")
REPORTED = {
    "image_features": (
        "featurized",
        "reused",
        "removed",
        "files_added",
        "files_removed",
        "bytes_written",
        "plan_seconds",
        "featurize_seconds",
        "model_setup_seconds",
        "worker_model_setup_seconds",
        "workers_built_model",
        "write_seconds",
    ),
    "pca_model": ("statistics_mode", "feature_rows_read", "statistics_seconds", "decomposition_seconds", "write_seconds"),
    "reduced_features": ("rows", "bytes_written", "write_seconds"),
    "raw_images": ("rows", "write_seconds"),
}


def materialize(images: Path, storage: Path, home: Path, log: Path, weights: str) -> dict:
    """One `dagster asset materialize --select '*'` in a fresh process, measured."""
    env = child_env(
        {
            "FRUIT_IMAGES_URI": str(images),
            "FRUIT_STORAGE_URI": str(storage),
            "FRUIT_MODEL_WEIGHTS": weights,
            "DAGSTER_HOME": str(home),
        }
    )
    command = [str(Path(sys.executable).with_name("dagster")), "asset", "materialize", "-m", "fruit_assets.definitions", "--select", "*"]
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = MemorySampler(process.pid).start()
        code = process.wait()
        memory = sampler.stop()
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"materialization failed (exit {code}); log: {log}\n" + "\n".join(log.read_text().splitlines()[-20:]))
    return {"wall_s": round(wall, 1), **memory, **run_details(home)}


def run_details(home: Path) -> dict:
    """Step durations and the assets' metadata of the latest run in this Dagster home."""
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs(limit=1)
        events = [r.event_log_entry for r in instance.get_records_for_run(run.run_id, limit=100_000).records]
    starts, steps, metadata = {}, {}, {}
    for entry in events:
        event = entry.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            steps[event.step_key] = round(entry.timestamp - starts[event.step_key], 1)
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            name = event.asset_key.to_user_string()
            values = {k: v.value for k, v in event.materialization.metadata.items()}
            metadata[name] = {k: values[k] for k in REPORTED.get(name, ()) if k in values}
    run_seconds = round(max(e.timestamp for e in events) - min(e.timestamp for e in events), 1)
    return {"run_id": run.run_id, "run_s": run_seconds, "steps_s": steps, "metadata": metadata}


def add_images(images: Path, workdir: Path, count: int) -> list[str]:
    """`count` new images in existing label folders (the demo generator's next images of each label)."""
    from fruit_assets_dev.demo_data import generate_demo_set

    labels = sorted(p.name for p in images.iterdir() if p.is_dir())
    per_label = len(list((images / labels[0]).glob("*.jpg")))
    extra = workdir / "extra"
    shutil.rmtree(extra, ignore_errors=True)
    generate_demo_set(extra, len(labels), per_label + -(-count // len(labels)))
    added = []
    for index in range(count):
        label = labels[index % len(labels)]
        name = f"r0_{per_label + index // len(labels)}.jpg"
        shutil.copy2(extra / label / name, images / label / name)
        added.append(f"{label}/{name}")
    return added


def table(result: dict) -> str:
    full, incremental = result["full"], result["incremental"]
    lines = [
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"vector flags: {result['machine'].get('vector_flags', '?')}",
        f"{result['images']} images, then {result['added']} added; load before: {result['load']}",
        "",
        "| | full run | incremental run | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| wall time of `dagster asset materialize` (s) | {full['wall_s']} | {incremental['wall_s']} "
        f"| **{incremental['wall_s'] / full['wall_s']:.3f}** |",
        f"| Dagster run, first to last event (s) | {full['run_s']} | {incremental['run_s']} | {incremental['run_s'] / full['run_s']:.3f} |",
    ]
    for step in sorted(set(full["steps_s"]) | set(incremental["steps_s"])):
        lines.append(f"| step `{step}` (s) | {full['steps_s'].get(step, '-')} | {incremental['steps_s'].get(step, '-')} | |")
    lines.append(f"| peak RSS of the process tree (MB) | {full['peak_rss_mb']} | {incremental['peak_rss_mb']} | |")
    lines.append(f"| CPU time of the process tree (s) | {full['cpu_s']} | {incremental['cpu_s']} | |")
    lines.append(f"| CPU taken by other processes meanwhile | {full['foreign_cpu_share']:.1%} | {incremental['foreign_cpu_share']:.1%} | |")
    for asset in ASSETS:
        for key in REPORTED[asset]:
            a, b = full["metadata"].get(asset, {}).get(key, "-"), incremental["metadata"].get(asset, {}).get(key, "-")
            lines.append(f"| {asset}: {key} | {a} | {b} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.incremental", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000, help="images of the full run (a multiple of 20)")
    parser.add_argument("--added", type=int, default=24, help="images added before the incremental run")
    parser.add_argument("--weights", default="random:0", help="FRUIT_MODEL_WEIGHTS of both runs")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR / "incremental")
    parser.add_argument("--report", type=Path, help="print the table of an earlier result file and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(table(json.loads(args.report.read_text())))
        return 0

    scratch = args.workdir / f"run-{time.strftime('%Y%m%dT%H%M%S')}"
    images = scratch / "images"
    shutil.copytree(image_set(args.workdir, args.images), images, copy_function=os.link)
    result = {"images": args.images, "added": args.added, "machine": machine_info(), "load": wait_for_quiet(0.5, 120)}
    print(f"full run on {args.images} images ...", flush=True)
    result["full"] = materialize(images, scratch / "storage", _home(scratch / "home-full"), scratch / "full.log", args.weights)
    add_images(images, scratch, args.added)
    print(f"incremental run after adding {args.added} ...", flush=True)
    result["incremental"] = materialize(
        images, scratch / "storage", _home(scratch / "home-incremental"), scratch / "incremental.log", args.weights
    )
    out = scratch / "result.json"
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"\nsaved: {out}")
    return 0


def _home(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
