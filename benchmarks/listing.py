"""Listing benchmark: `raw_images`'s listing and `fruit_images_sensor`'s ticks on a big bucket.

    .venv/bin/python -m benchmarks.listing                    # 200,000 objects in 150 label folders
    .venv/bin/python -m benchmarks.listing --quick            # smoke run: 20,000 objects
    .venv/bin/python -m benchmarks.listing --objects 1000000 --delays-ms 0,50

It starts its own SeaweedFS on loopback (data under <workdir>/listing/s3data, kept between runs with
the uploaded objects: the first run uploads them, 32 at a time, later runs reuse them) and puts a
request-counting proxy in front of it (`benchmarks.s3_proxy`), once without delay and once adding
50 ms to every request, the round trip of a LIST against AWS. Each measurement runs in a fresh
process, which reports its wall time, CPU time and peak RSS; the proxy reports its requests:

- list, today: the listing before issue 17 (a frozen copy below): one recursive pyarrow listing;
- list: `catalog.list_images` as `raw_images` calls it (folders in parallel), and its pandas catalog;
- raw_images: the whole asset through Dagster `materialize()` (listing, contact sheet, Parquet);
- tick, today: what a tick did before issue 17: that listing and a row-by-row JSON digest;
- first tick / no-change tick: `fruit_images_sensor.evaluate_tick`, without a cursor, then with the
  cursor of the first tick (nothing changed in between).

It then models one million objects against AWS (`benchmarks.listing_model`): LIST requests, rounds of
round trips at 50 ms, plus the client CPU per object measured here. Results: Markdown on stdout and
JSON under <workdir>/listing/.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import posixpath
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from math import ceil
from pathlib import Path

from benchmarks import listing_model as model
from benchmarks.common import DEFAULT_WORKDIR, REPO_ROOT, busy_cpu_seconds, child_env, loadavg, machine_info

BUCKET = "bench"
MEASUREMENTS = ("list-today", "list", "raw-images", "tick-today", "tick-first", "tick-again")
LABELS = {
    "list-today": "raw_images listing, today (sequential)",
    "list": "raw_images listing (`catalog.list_images`)",
    "raw-images": "raw_images, whole asset",
    "tick-today": "sensor tick, today (sequential + row digest)",
    "tick-first": "sensor tick, first",
    "tick-again": "sensor tick, nothing new",
}
EXTRAPOLATE_TO = 1_000_000


# --------------------------------------------------------------------------------- today's code


def sequential_list_images(root):
    """`catalog.list_images` as it was before issue 17 (frozen copy, for comparison)."""
    import pandas as pd
    import pyarrow.fs as pafs

    from fruit_assets.ml.images import is_image_path

    rows, ignored = [], []
    selector = pafs.FileSelector(root.path, recursive=True, allow_not_found=True)
    for info in root.filesystem.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        relative = posixpath.relpath(info.path, root.path)
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts):
            continue
        if len(parts) < 2 or not is_image_path(info.path):
            ignored.append(root.uri_of(info.path))
            continue
        rows.append({"path": root.uri_of(info.path), "label": parts[-2], "size_bytes": info.size, "modified_at": info.mtime})
    catalog = pd.DataFrame(rows, columns=["path", "label", "size_bytes", "modified_at"])
    catalog["size_bytes"] = catalog["size_bytes"].astype("int64")
    catalog["modified_at"] = pd.to_datetime(catalog["modified_at"], utc=True)
    return catalog.sort_values("path", ignore_index=True), sorted(ignored)


def rowwise_digest(catalog) -> str:
    """`sensors.images_digest` as it was before issue 17 (frozen copy, for comparison)."""
    import hashlib

    digest = hashlib.sha256()
    rows = catalog.sort_values("path")
    mtimes = rows["modified_at"].astype("int64") if len(rows) else []
    for path, size, mtime in zip(rows["path"], rows["size_bytes"], mtimes, strict=True):
        digest.update(json.dumps([str(path), int(size), int(mtime)]).encode("utf-8") + b"\n")
    return digest.hexdigest()


def today_tick(root) -> int:
    """A tick before issue 17, minus Dagster's own (small) overhead: list, drop fresh images, digest."""
    import pandas as pd

    listed_at = time.time()
    catalog, _ = sequential_list_images(root)
    settled = catalog[catalog["modified_at"] <= pd.Timestamp(listed_at - 2.0, unit="s", tz="UTC")]
    rowwise_digest(settled)
    return len(catalog)


# ------------------------------------------------------------------------------ child measurement


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: the peak RSS of this process image. (Not ru_maxrss, which survives exec: a child would
    report its parent's peak if that was higher.)"""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _measure_listing(what: str, uri: str, concurrency: int) -> dict:
    from fruit_assets import storage
    from fruit_assets.pipeline.listing import list_images

    root = storage.resolve(uri, setting="FRUIT_IMAGES_URI")
    if what == "list-today":
        return {"images": len(sequential_list_images(root)[0])}
    if what == "tick-today":
        return {"images": today_tick(root)}
    listing = list_images(root, concurrency=concurrency)
    return {"images": len(listing.catalog()), "flat": listing.flat, "folders": listing.folders}


def _measure_tick(uri: str, concurrency: int, cursor: str | None) -> dict:
    from dagster import DagsterInstance, build_sensor_context

    from fruit_assets.resources import ImageSource
    from fruit_assets.sensors import TAG_IMAGES, fruit_images_sensor

    with DagsterInstance.ephemeral() as instance:
        images = ImageSource(uri=uri, list_concurrency=concurrency)
        context = build_sensor_context(instance=instance, cursor=cursor, resources={"images": images})
        started = time.perf_counter()
        result = fruit_images_sensor.evaluate_tick(context)
        seconds = time.perf_counter() - started
    images = result.run_requests[0].tags[TAG_IMAGES] if result.run_requests else None
    return {
        "tick_seconds": seconds,
        "images": images,
        "skip": result.skip_message,
        "cursor": result.cursor or cursor,
        "cursor_bytes": len((result.cursor or cursor or "").encode()),
    }


def _measure_raw_images(uri: str, concurrency: int, storage_dir: str) -> dict:
    from dagster import materialize

    from fruit_assets.assets import raw_images
    from fruit_assets.resources import ImageSource, build_resources

    os.environ["FRUIT_STORAGE_URI"] = storage_dir  # the deployment's own IO manager, as users run it
    resources = {"images": ImageSource(uri=uri, list_concurrency=concurrency), "io_manager": build_resources("local")["io_manager"]}
    result = materialize([raw_images], resources=resources)
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    return {"images": metadata["rows"].value, "listing_seconds": metadata["listing_seconds"].value}


def child_main(args) -> int:
    """One measurement in this (fresh) process; writes JSON to args.json."""
    import fruit_assets.pipeline.listing

    if args.what.startswith(("tick", "raw")):
        import dagster  # noqa: F401

        import fruit_assets.sensors  # noqa: F401
    cursor = Path(args.cursor_file).read_text() if args.cursor_file else None
    rss_before, cpu_before, started = _rss_mb(), _cpu_seconds(), time.perf_counter()
    if args.what in ("tick-first", "tick-again"):
        result = _measure_tick(args.uri, args.concurrency, cursor)
    elif args.what == "raw-images":
        result = _measure_raw_images(args.uri, args.concurrency, args.storage)
    else:
        result = _measure_listing(args.what, args.uri, args.concurrency)
    result.update(
        seconds=time.perf_counter() - started,
        cpu_seconds=_cpu_seconds() - cpu_before,
        rss_before_mb=rss_before,
        peak_rss_mb=_peak_rss_mb(),
    )
    Path(args.json).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------- the data


def tiny_jpeg() -> bytes:
    """An 8x8 JPEG (about 300 bytes): small, and still an image the contact sheet can decode."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 30)).save(out, "JPEG", quality=80)
    return out.getvalue()


def dataset_keys(prefix: str, objects: int, labels: int) -> list[str]:
    sizes = model.folder_sizes(objects, labels)
    return [f"{prefix}/Label_{label:03d}/r0_{index}.jpg" for label, size in enumerate(sizes) for index in range(size)]


def ensure_dataset(server, objects: int, labels: int) -> str:
    """Upload the objects that are not there yet; return the images URI. A marker records completion."""
    prefix, marker = f"images-{objects}x{labels}", f"markers/images-{objects}x{labels}"
    client = server.client(max_pool_connections=64)
    server.create_bucket(BUCKET)
    if client.list_objects_v2(Bucket=BUCKET, Prefix=marker).get("KeyCount", 0):
        return f"s3://{BUCKET}/{prefix}"
    existing = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        existing.update(item["Key"] for item in page.get("Contents", []))
    missing = [key for key in dataset_keys(prefix, objects, labels) if key not in existing]
    body, started = tiny_jpeg(), time.perf_counter()
    print(f"uploading {len(missing)} objects ({len(existing)} already there) ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(32) as pool:
        for done, _ in enumerate(pool.map(lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=body), missing), 1):
            if done % 20000 == 0:
                print(f"  {done} uploaded, {done / (time.perf_counter() - started):.0f}/s", file=sys.stderr, flush=True)
    client.put_object(Bucket=BUCKET, Key=marker, Body=b"complete\n")
    return f"s3://{BUCKET}/{prefix}"


# ---------------------------------------------------------------------------------- orchestration


def _process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_child(what: str, uri: str, env: dict, workdir: Path, concurrency: int, cursor_file: Path | None) -> dict:
    out = workdir / f"{what}.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.listing",
        "measure",
        "--what",
        what,
        "--uri",
        uri,
        "--json",
        str(out),
        "--concurrency",
        str(concurrency),
        "--storage",
        str(workdir / "storage"),
    ]
    if cursor_file is not None:
        command += ["--cursor-file", str(cursor_file)]
    with open(workdir / f"{what}.log", "w") as log:
        subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=3600)
    return json.loads(out.read_text())


def measure_all(server, uri: str, delay: float, workdir: Path, concurrency: int, repeat: int = 1) -> dict[str, dict]:
    """Every measurement through a proxy adding `delay` s per request, `repeat` times each, keeping the
    fastest (the least disturbed by other processes); adds requests and noise to each."""
    from benchmarks.s3_proxy import CountingProxy

    results: dict[str, dict] = {}
    with CountingProxy(server.port, delay) as proxy:
        env = child_env(server.env() | {"AWS_ENDPOINT_URL": proxy.endpoint_url})
        for what in MEASUREMENTS:
            tries = [measure_one(server, proxy, what, uri, env, workdir, concurrency) for _ in range(repeat)]
            results[what] = min(tries, key=_seconds_of) | {"all_seconds": [_seconds_of(run) for run in tries]}
            print(
                f"  {delay * 1000:4.0f} ms  {what:11s} {results[what]['all_seconds']} s  {results[what]['requests']}",
                file=sys.stderr,
                flush=True,
            )
    return results


def measure_one(server, proxy, what: str, uri: str, env: dict, workdir: Path, concurrency: int) -> dict:
    """One child run, with the requests it made and the CPU other processes used meanwhile."""
    cursor_file = workdir / f"cursor-{uri.rsplit('/', 1)[1]}.json"
    busy, weed, own = busy_cpu_seconds(), _process_cpu(server.pid), _cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load, started = loadavg(), time.perf_counter()
    proxy.reset()
    result = run_child(what, uri, env, workdir, concurrency, cursor_file if what == "tick-again" else None)
    result["peak_in_flight"] = proxy.peak_in_flight  # counted only while requests are delayed
    result["requests"] = dict(proxy.reset())
    result["process_wall_s"] = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    server_cpu = _process_cpu(server.pid) - weed
    ours = child_cpu + server_cpu + _cpu_seconds() - own
    result.update(load_before=load, server_cpu_s=server_cpu, foreign_cpu_s=round(max(0.0, busy_cpu_seconds() - busy - ours), 1))
    if what == "tick-first":
        cursor_file.write_text(result["cursor"])
    result.pop("cursor", None)
    return result


def _seconds_of(result: dict) -> float:
    return result.get("tick_seconds", result["seconds"])


# ------------------------------------------------------------------------------------- analysis


def _plan(what: str, objects: int, labels: int, concurrency: int) -> model.Plan:
    if what.endswith("today"):
        return model.sequential(objects)
    return model.catalog_listing(model.folder_sizes(objects, labels), concurrency)[0]


# raw_images also reads the contact sheet's 72 images, 16 at a time, a HEAD and a GET each: not a
# LIST, but round trips all the same.
EXTRA_ROUNDS = {"raw-images": 2 * ceil(72 / 16)}


def analyse(report: dict) -> dict[str, dict]:
    """Per measurement: the figures of the table, and the model at a million objects.

    The rounds model is checked on this machine: time with latency = time on loopback + rounds x
    latency. Against AWS the server's work is inside the 50 ms, so: time = fixed + rounds x 50 ms +
    client CPU per object x objects, where `fixed` is the same measurement on a single object (process,
    Dagster, S3 client set-up) and the CPU per object is the client CPU above that fixed run's. The CPU
    is added in full, as if it never overlapped with waiting or used the second core: an upper bound."""
    objects, labels, concurrency = report["objects"], report["labels"], report["concurrency"]
    loopback, delayed = report["runs"].get("0"), report["runs"].get("50")
    rows = {}
    for what in MEASUREMENTS:
        base, fixed = (loopback or delayed)[what], report["fixed"][what]
        fixed_s = _seconds_of(fixed)
        cpu_per_object = max(0.0, base["cpu_seconds"] - fixed["cpu_seconds"]) / objects
        plan, plan_1m = _plan(what, objects, labels, concurrency), _plan(what, EXTRAPOLATE_TO, labels, concurrency)
        extra = EXTRA_ROUNDS.get(what, 0)
        runs = [run[what] for run in report["runs"].values()]
        rows[what] = {
            "list_requests": base["requests"].get("LIST", 0),
            "model_requests": plan.requests,
            "loopback_s": _seconds_of(loopback[what]) if loopback else None,
            "delayed_s": _seconds_of(delayed[what]) if delayed else None,
            "model_delayed_s": _seconds_of(loopback[what]) + (plan.rounds + extra) * 0.05 if loopback else None,
            "client_cpu_s": base["cpu_seconds"],
            "cpu_us_per_object": cpu_per_object * 1e6,
            "server_cpu_s": base.get("server_cpu_s"),
            "peak_in_flight": delayed[what].get("peak_in_flight") if delayed else None,
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "rss_growth_mb": max(run["peak_rss_mb"] - run["rss_before_mb"] for run in runs),
            "requests_1m": plan_1m.requests,
            "aws_1m_s": fixed_s + (plan_1m.rounds + extra) * model.AWS_LIST_SECONDS + cpu_per_object * EXTRAPOLATE_TO,
            "loopback_1m_s": (fixed_s + (_seconds_of(loopback[what]) - fixed_s) * EXTRAPOLATE_TO / objects if loopback else None),
        }
    return rows


def _cell(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def markdown(report: dict) -> str:
    rows = analyse(report)
    n, labels = report["objects"], report["labels"]
    lines = [
        f"{n:,} objects in {labels} label folders, {report['concurrency']} folders at a time, fastest of "
        f"{report.get('repeat', 1)}. Times in seconds. CPU: of the measuring process (client) and of SeaweedFS "
        "(server), on loopback. RSS in MB: peak of the measuring process / growth during the measurement.",
        "",
        "| measurement | LIST requests (model) | loopback | +50 ms per request (in flight) "
        "| model: loopback + rounds x 50 ms | client CPU (us/object) | server CPU | peak RSS / growth "
        "| 1M: LIST requests | 1M: AWS model, 50 ms | 1M: loopback, linear |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for what, row in rows.items():
        lines.append(
            f"| {LABELS[what]} | {row['list_requests']:,} ({row['model_requests']:,}) | {_cell(row['loopback_s'])} "
            f"| {_cell(row['delayed_s'])} ({_cell(row['peak_in_flight'])}) | {_cell(row['model_delayed_s'])} "
            f"| {row['client_cpu_s']:.1f} ({row['cpu_us_per_object']:.0f}) | {_cell(row['server_cpu_s'])} "
            f"| {row['peak_rss_mb']:,.0f} / {row['rss_growth_mb']:,.0f} | {row['requests_1m']:,} "
            f"| {_cell(row['aws_1m_s'])} | {_cell(row['loopback_1m_s'])} |"
        )
    cpu_per_object = rows["list"]["cpu_us_per_object"] / 1e6
    lines += ["", shapes_table(report["concurrency"], cpu_per_object), "", machine_lines(report)]
    return "\n".join(lines)


def shapes_table(concurrency: int, cpu_per_object: float) -> str:
    """The model at a million objects in other layouts, for the listing of `catalog.list_images`."""
    lines = [
        f"A million objects in other layouts (model: 50 ms per LIST, {cpu_per_object * 1e6:.0f} us of client CPU per object):",
        "",
        "| label folders | objects per folder | strategy | LIST requests | rounds | time (s) | today: requests / time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    today = model.sequential(EXTRAPOLATE_TO)
    for labels in (1, 150, 2000, 21000, 100_000):
        sizes = model.folder_sizes(EXTRAPOLATE_TO, labels)
        plan, flat = model.catalog_listing(sizes, concurrency)
        lines.append(
            f"| {labels:,} | {EXTRAPOLATE_TO // labels:,} | {'flat (sampled first)' if flat else 'folder by folder'} "
            f"| {plan.requests:,} | {plan.rounds:,} | {plan.seconds(0.05, cpu_per_object, EXTRAPOLATE_TO):.1f} "
            f"| {today.requests:,} / {today.seconds(0.05, cpu_per_object, EXTRAPOLATE_TO):.1f} |"
        )
    return "\n".join(lines)


def machine_lines(report: dict) -> str:
    machine = report["machine"]
    runs = [run for runs in report["runs"].values() for run in runs.values()]
    loads = [float(run["load_before"].split()[0]) for run in runs]
    wall = sum(run["process_wall_s"] for run in runs)
    foreign = sum(run["foreign_cpu_s"] for run in runs)
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB; pyarrow "
        f"{machine['versions'].get('pyarrow')}, dagster {machine['versions'].get('dagster')}; SeaweedFS on the "
        f"same cores. Noise: 1-minute load {min(loads):.1f} to {max(loads):.1f} before the measurements; other "
        f"processes (not this benchmark, not SeaweedFS) used {foreign:.0f} CPU s during the {wall:.0f} s "
        f"the measuring processes ran: {foreign / (wall * machine['cores']):.0%} of the machine."
    )


# ------------------------------------------------------------------------------------------- main


def run(args) -> dict:
    from fruit_assets_dev.local_s3 import start_local_s3

    workdir = Path(args.workdir) / "listing"
    workdir.mkdir(parents=True, exist_ok=True)
    server = start_local_s3(data_dir=workdir / "s3data", die_with_parent=True)
    try:
        uri = ensure_dataset(server, args.objects, args.labels)
        tiny = ensure_dataset(server, 1, 1)
        report = {
            "objects": args.objects,
            "labels": args.labels,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
            "uri": uri,
            "machine": machine_info(),
            "runs": {},
        }
        # The same measurements of one object: their time and CPU are what does not grow with the bucket.
        report["fixed"] = measure_all(server, tiny, 0.0, workdir, args.concurrency)
        for delay_ms in args.delays_ms:
            report["runs"][str(delay_ms)] = measure_all(server, uri, delay_ms / 1000, workdir, args.concurrency, args.repeat)
    finally:
        server.stop()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (workdir / f"results-{args.objects}-{stamp}.json").write_text(json.dumps(report, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["measure"]:
        child = argparse.ArgumentParser(prog="python -m benchmarks.listing measure")
        for name in ("--what", "--uri", "--json", "--storage"):
            child.add_argument(name, required=True)
        child.add_argument("--concurrency", type=int, required=True)
        child.add_argument("--cursor-file")
        return child_main(child.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(prog="python -m benchmarks.listing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=200_000)
    parser.add_argument("--labels", type=int, default=150)
    parser.add_argument("--delays-ms", default="0,50", help="added to every request, one run per value")
    parser.add_argument("--concurrency", type=int, default=32, help="label folders listed at the same time")
    parser.add_argument("--repeat", type=int, default=1, help="measure each this many times, keep the fastest")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20,000 objects")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR), help="SeaweedFS data, logs and results")
    parser.add_argument("--report", metavar="RESULTS_JSON", help="print the tables of an earlier run")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return 0
    args.objects = 20_000 if args.quick else args.objects
    args.delays_ms = [int(value) for value in args.delays_ms.split(",")]
    print(markdown(run(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
