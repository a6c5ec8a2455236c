"""Graph runs in a row through S3 faults (issue 23's "done when"), then a check of every table.

    python -m benchmarks.fault_soak                        # 10 runs, 2% of each fault
    python -m benchmarks.fault_soak --runs 3 --rate 0.06   # harsher, shorter

A local SeaweedFS holds the images and the tables; every request of the pipeline (the driver, and the
Spark workers, which inherit the endpoint when the JVM starts) goes through `FaultProxy`, which gives
each fault kind to `--rate` of the requests: 503 SlowDown, a reset before the request is forwarded,
an answer lost after the store applied the request, a slow answer. The graph is materialized `--runs`
times in this process, `--added` new images uploaded (straight to the store) before each run after the
first. Then, with no faults, the graph runs once on a fresh prefix as the reference, and:
- every run must have succeeded;
- every version of every table must read back (no data file that a version names is gone);
- raw_images, image_features and reduced_features have one row per image;
- the features, the PCA and the reduced features equal the reference's.
Prints one JSON report (runs, faults injected, commit attempts, check results, machine) and exits 1
if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ASSETS = ("raw_images", "image_features", "pca_model", "reduced_features")
BUCKET = "fruit-soak"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0.02, help="fraction of requests given each fault kind")
    parser.add_argument("--slow-seconds", type=float, default=0.2)
    parser.add_argument("--images", type=int, default=3, help="images per label (24 labels) at the first run")
    # 72 images a run: more than the 64 that the driver featurizes itself, so the Spark tasks work too
    parser.add_argument("--added", type=int, default=3, help="images per label added before each later run")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)

    from benchmarks.common import child_env, machine_info
    from fruit_assets_dev.local_s3 import start_local_s3
    from fruit_assets_dev.s3_proxy import FaultProxy

    scratch = Path(tempfile.mkdtemp(prefix="fault-soak-"))
    server = start_local_s3(data_dir=str(scratch / "s3"), die_with_parent=True)
    proxy = FaultProxy(server.port, seed=args.seed, slow_seconds=args.slow_seconds)
    try:
        server.create_bucket(BUCKET)
        proxy.start()
        # Before Spark starts: its Python workers get the environment the JVM started with.
        os.environ.update(child_env(server.env() | {"AWS_ENDPOINT_URL": proxy.endpoint_url}))
        report = soak(args, server, proxy, scratch)
    finally:
        proxy.stop()
        server.stop()
    report["machine"] = machine_info()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


def soak(args, server, proxy, scratch: Path) -> dict:
    images_uri, storage_uri = f"s3://{BUCKET}/images", f"s3://{BUCKET}/assets"
    local_images = scratch / "images"
    uploaded: set[str] = set()
    runs = []
    proxy.rates.update(slowdown=args.rate, reset=args.rate, lost=args.rate, slow=args.rate)
    for number in range(args.runs):
        count = upload_new_images(server, local_images, args.images + number * args.added, uploaded)
        before, requests_before = dict(proxy.injected), sum(proxy.counts.values())
        started = time.perf_counter()
        outcome = run_graph(images_uri, storage_uri)
        injected = {k: v - before.get(k, 0) for k, v in proxy.injected.items() if v - before.get(k, 0)}
        runs.append(outcome | {"run": number + 1, "images": count, "seconds": round(time.perf_counter() - started, 1),
                               "requests": sum(proxy.counts.values()) - requests_before, "injected": injected})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    proxy.rates.update(slowdown=0.0, reset=0.0, lost=0.0, slow=0.0)
    reference_uri = f"s3://{BUCKET}/reference"
    reference = run_graph(images_uri, reference_uri)
    checks = check_tables(storage_uri, reference_uri, len(uploaded)) if reference["ok"] else {"reference run": reference}
    ok = all(run["ok"] for run in runs) and reference["ok"] and all(value is True for value in checks.values())
    return {
        "ok": ok,
        "runs_succeeded": sum(run["ok"] for run in runs),
        "runs": runs,
        "rate_per_fault_kind": args.rate,
        "requests": sum(proxy.counts.values()),
        "injected": dict(proxy.injected),
        "lost_answers_after_the_store_applied_the_request": proxy.lost_answers,
        "checks": checks,
    }


def upload_new_images(server, local_images: Path, per_label: int, uploaded: set[str]) -> int:
    """Generate the demo set with `per_label` images per label; upload the ones not uploaded yet."""
    from fruit_assets_dev.demo_data import generate_demo_set

    generate_demo_set(local_images, 24, per_label)
    client = server.client()
    for path in sorted(local_images.rglob("*.jpg")):
        key = path.relative_to(local_images).as_posix()
        if key not in uploaded:
            client.upload_file(str(path), BUCKET, f"images/{key}")
            uploaded.add(key)
    return len(uploaded)


def run_graph(images_uri: str, storage_uri: str) -> dict:
    """One in-process materialization of the whole graph; its outcome and the commits' attempts."""
    from dagster import materialize

    from fruit_assets.definitions import all_assets_and_checks
    from fruit_assets.resources import FeatureModel, ImageSource, build_resources
    from fruit_assets.resources.io_manager import DeltaIOManager
    from fruit_assets.storage.resource import Storage

    resources = build_resources("local")
    resources["storage"] = Storage(base_uri=storage_uri)
    resources["io_manager"] = DeltaIOManager(storage=resources["storage"])
    resources["images"] = ImageSource(uri=images_uri)
    resources["feature_model"] = FeatureModel(weights="random:0")
    try:
        result = materialize(all_assets_and_checks, resources=resources, raise_on_error=False)
    except Exception as error:  # a failure outside the steps (resource set-up): reported, not raised
        return {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
    outcome: dict = {"ok": result.success}
    attempts = {}
    for event in result.get_asset_materialization_events():
        metadata = event.materialization.metadata
        if "commit_attempts" in metadata:
            attempts[event.asset_key.to_user_string()] = (metadata["commit_attempts"].value, metadata["commit_answers_lost"].value)
    outcome["commit_attempts_and_answers_lost"] = attempts
    if not result.success:
        outcome["error"] = failure_text(result)[:4000]
    return outcome


def failure_text(result) -> str:
    texts = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        while error is not None:
            texts.append(error.message)
            error = error.cause
    return "\n".join(texts)


def check_tables(storage_uri: str, reference_uri: str, images: int) -> dict:
    """Every table whole, one row per image, and equal to the reference run's."""
    import numpy as np

    from fruit_assets.storage import delta, resolve

    checks: dict = {}
    for asset in ASSETS:
        location = resolve(storage_uri).child(asset)
        checks[f"{asset}: every version reads back"] = every_version_whole(delta, location)
    frames = {}
    for uri in (storage_uri, reference_uri):
        frames[uri] = {asset: delta.read_arrow(resolve(uri).child(asset)).to_pandas() for asset in ASSETS}
    soaked, reference = frames[storage_uri], frames[reference_uri]
    for asset in ("raw_images", "image_features", "reduced_features"):
        paths = soaked[asset]["path"]
        checks[f"{asset}: one row per image"] = len(paths) == images and paths.is_unique or f"{len(paths)} rows, {paths.nunique()} paths"
    for asset, column, tolerance in (("image_features", "features", 1e-5), ("reduced_features", "pca_features", 1e-4)):
        got = soaked[asset].set_index("path").sort_index()
        expected = reference[asset].set_index("path").sort_index()
        same_paths = list(got.index) == list(expected.index)
        close = same_paths and np.allclose(np.stack(got[column]), np.stack(expected[column]), rtol=tolerance, atol=tolerance)
        checks[f"{asset}: equal to the run without faults"] = bool(close) or "differs"
    got, expected = soaked["pca_model"].sort_values("component"), reference["pca_model"].sort_values("component")
    def column(frame, name):
        values = frame[name].to_list()
        return np.stack(values) if values and hasattr(values[0], "__len__") else np.asarray(values)

    numeric = [c for c in got.columns if c != "component" and not isinstance(got[c].iloc[0], str)]
    checks["pca_model: equal to the run without faults"] = (
        len(got) == len(expected) and all(np.allclose(column(got, c), column(expected, c), atol=1e-4) for c in numeric)
    ) or "differs"
    return checks


def every_version_whole(delta, location) -> bool | str:
    import pyarrow.fs as pafs

    latest = delta.snapshot(location)
    if latest is None:
        return "no table"
    for version in range(latest.version + 1):
        snapshot = delta.snapshot(location, version)
        if snapshot is None:
            return f"version {version} missing"
        for file in snapshot.files:
            if location.filesystem.get_file_info(snapshot.file_location(file.path).path).type != pafs.FileType.File:
                return f"version {version} names {file.path}, which is gone"
    return True


if __name__ == "__main__":
    sys.exit(main())
