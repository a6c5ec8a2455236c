"""Shared helpers of the benchmarks: image sets, the weights file, running a measured child process
while sampling the memory of its whole process tree, and a description of the machine.

Only the standard library, numpy and Pillow here: the orchestrating process stays light (no
TensorFlow, no Spark), so that its own CPU use does not disturb what it measures.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path(os.environ.get("FRUIT_BENCH_DIR", "/tmp/fruit_benchmarks"))
LABELS = 20  # image sets are LABELS x (n / LABELS) demo images
SEED_SET = 72  # the demo/seed size: 24 labels x 3 images, like the original notebook's sample
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------- data


def image_set(workdir: Path, n: int) -> Path:
    """A folder of exactly `n` deterministic demo images in the Fruits-360 layout (made once)."""
    from fruit_assets_dev.demo_data import generate_demo_set

    if n == SEED_SET:
        labels, per_label = 24, 3
    elif n < LABELS:
        labels, per_label = n, 1
    elif n % LABELS == 0:
        labels, per_label = LABELS, n // LABELS
    else:
        raise SystemExit(f"image set sizes must be multiples of {LABELS} (or {SEED_SET}), got {n}")
    root = workdir / "images" / f"n{n}"
    marker = root / ".complete"  # hidden: neither the catalog nor binaryFile's *.jpg glob sees it
    if not marker.exists():
        generate_demo_set(root, labels, per_label)
        marker.write_text(f"{labels} x {per_label}\n")
    return root


def weights_file(workdir: Path) -> Path:
    """The `random:0` MobileNetV2 (no top) as a legacy Keras .h5 file, like the ImageNet download.

    All methods load this same file, as users would load the ImageNet weights file: the baseline and the
    notebook through keras.applications, the pipeline through FRUIT_MODEL_WEIGHTS=<path>."""
    path = workdir / "mobilenet_v2_random0_no_top.h5"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "benchmarks.methods", "make-weights", "--out", str(path)],
            cwd=REPO_ROOT,
            check=True,
            env=child_env(),
        )
    return path


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("FRUIT_"):
            del env[name]  # a developer's settings must not leak into measurements
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    env["PYSPARK_PYTHON"] = sys.executable
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------------------- memory


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name, which is in parentheses and may contain spaces.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _tree(root: int) -> list[int]:
    children, found, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


TICK = os.sysconf("SC_CLK_TCK")


def _machine_cpu_ticks() -> list[int]:
    """The machine's CPU ticks since boot, all cores (/proc/stat's `cpu` line): user, nice, system, idle,
    iowait, irq, softirq, steal, ..."""
    with open("/proc/stat") as f:
        return [int(v) for v in f.readline().split()[1:]]


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores) since boot, from /proc/stat."""
    fields = _machine_cpu_ticks()
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK


def steal_cpu_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests since boot (/proc/stat): a noisy neighbour's share."""
    return _machine_cpu_ticks()[7] / TICK


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def _rss_and_kind(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            rss = int(f.read().split()[1]) * PAGE
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    if "java" in cmd.split(" ", 1)[0]:
        kind = "jvm"
    elif "pyspark.daemon" in cmd or "pyspark/worker" in cmd or "pyspark.worker" in cmd:
        kind = "python_workers"
    else:
        kind = "driver"
    return rss, kind


@dataclass
class MemorySampler:
    """Samples the summed RSS of a process and all its descendants (JVM, Spark Python workers, ...)
    every `interval` seconds, in a background thread. It also adds up the CPU time of that process tree
    and compares it with the whole machine's busy time over the same period: the difference is CPU used
    by anything else (other users' jobs), reported as `foreign_cpu_s`, a direct measure of noise."""

    pid: int
    interval: float = 0.2
    peak_total: int = 0
    peak_by_kind: dict[str, int] = field(default_factory=dict)
    peak_processes: int = 0
    samples: int = 0
    cpu_by_pid: dict[int, float] = field(default_factory=dict)
    busy_start: float = 0.0
    wall_start: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> MemorySampler:
        self.busy_start, self.wall_start = busy_cpu_seconds(), time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        total, by_kind, count = 0, {}, 0
        for pid in _tree(self.pid):
            found = _rss_and_kind(pid)
            if found is None:
                continue
            rss, kind = found
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self.cpu_by_pid[pid] = max(cpu, self.cpu_by_pid.get(pid, 0.0))
            total += rss
            by_kind[kind] = by_kind.get(kind, 0) + rss
            count += 1
        self.samples += 1
        self.peak_total = max(self.peak_total, total)
        self.peak_processes = max(self.peak_processes, count)
        for kind, rss in by_kind.items():
            self.peak_by_kind[kind] = max(self.peak_by_kind.get(kind, 0), rss)

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        busy = busy_cpu_seconds() - self.busy_start
        wall = time.perf_counter() - self.wall_start
        ours = sum(self.cpu_by_pid.values())
        return {
            "cpu_s": round(ours, 1),
            "machine_busy_cpu_s": round(busy, 1),
            # CPU time of everything else, e.g. other jobs on the machine (minus a little: the last
            # fraction of a second of each of our processes escapes the 0.2 s sampling).
            "foreign_cpu_s": round(max(0.0, busy - ours), 1),
            "foreign_cpu_share": round(max(0.0, busy - ours) / (wall * (os.cpu_count() or 1)), 3) if wall else 0.0,
            "peak_rss_mb": round(self.peak_total / 2**20),
            "peak_rss_mb_by_kind": {k: round(v / 2**20) for k, v in sorted(self.peak_by_kind.items())},
            "peak_processes": self.peak_processes,
            "memory_samples": self.samples,
        }


# -------------------------------------------------------------------------------------- child runs


class ChildFailed(RuntimeError):
    pass


def run_child(args: list[str], log: Path, extra_env: dict[str, str] | None = None, timeout: float = 3600) -> dict:
    """Run `python -m benchmarks.methods <args> --json FILE` in a fresh process, sampling the memory of
    its process tree; return the JSON it wrote, plus wall time and memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    result_path = log.with_suffix(".json")
    result_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.methods", *args, "--json", str(result_path)]
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write(" ".join(command) + "\n")
        out.flush()
        # Its own process group, so that the whole tree (JVM, Python workers) can be stopped with it.
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=child_env(extra_env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        sampler = MemorySampler(process.pid).start()
        try:
            code = process.wait(timeout=timeout)
        except BaseException as error:  # timeout, Ctrl-C, SIGTERM: never leave the tree running
            _stop_group(process)
            if isinstance(error, subprocess.TimeoutExpired):
                raise ChildFailed(f"timed out after {timeout} s: {' '.join(args)} (log: {log})") from error
            raise
        finally:
            memory = sampler.stop()
    wall = time.perf_counter() - started
    if code != 0 or not result_path.exists():
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise ChildFailed(f"{' '.join(args)} failed with exit code {code} (log: {log}):\n" + "\n".join(tail))
    result = json.loads(result_path.read_text())
    result.update(memory)
    result["process_wall_s"] = round(wall, 2)
    return result


def _stop_group(process: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------ machine


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_for_quiet(threshold: float, max_wait: float) -> str:
    """Wait (up to max_wait s) until the 1-minute load is below `threshold`; return the load seen."""
    deadline = time.time() + max_wait
    while True:
        load = loadavg()
        if float(load.split()[0]) < threshold or time.time() >= deadline:
            return load
        time.sleep(10)


def machine_info() -> dict:
    cpu, flags, ids = "unknown", [], {}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == "unknown":
            cpu = line.split(":", 1)[1].strip()
        key = line.split(":", 1)[0].strip()
        if key in ("cpu family", "model") and key not in ids:
            ids[key] = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line.split(":", 1)[1].split()
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    versions = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for package in (
        "tensorflow-cpu",
        "keras",
        "onnxruntime",
        "tf2onnx",
        "onnx",
        "pyspark",
        "dagster",
        "pillow",
        "numpy",
        "pyarrow",
        "pandas",
    ):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()[0]
    except (OSError, IndexError):
        java = "unknown"
    return {
        "cpu": cpu,
        "cpu_id": f"family {ids.get('cpu family', '?')} model {ids.get('model', '?')}",  # "AMD EPYC" alone names no generation
        # What decides which kernels the runtimes use: AVX2/FMA, AVX-512 (VNNI, BF16), AMX.
        "vector_flags": " ".join(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "vnni"))) or "none",
        "cpu_flags": " ".join(flags),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "java": java,
        "versions": versions,
    }
