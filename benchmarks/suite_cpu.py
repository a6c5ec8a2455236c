"""Where the test suite's CPU goes: each test's CPU, its module's, each kind of process's and the busy cores over time.

    python -m benchmarks.suite_cpu OUT_DIR [-- COMMAND ...]     # default command: .venv/bin/pytest

The suite is CPU-bound on 2 cores (issue 21), so its wall time follows its CPU, and most of that is in
processes the tests start (JVMs, CLI runs, emulated Databricks tasks, their Python workers), which
`pytest --durations` does not see. This runs the command as a child subreaper (orphaned JVMs are
counted too) and samples /proc every 0.25 s: each process's CPU goes to the pytest-xdist worker named
by PYTEST_XDIST_WORKER in its environment (inherited by everything a test starts), and from the worker
to the test it was running (this module is also the pytest plugin that logs when each test starts and
ends). CPU of processes without a worker (the install, the controller's background builds) is listed
apart. A process that starts and ends between two samples is missed: the total is below the tree's CPU,
which is printed too. Only the command's own process tree is sampled. Linux only; root sees every environment.
"""

from __future__ import annotations

import bisect
import collections
import ctypes
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

DIR_VARIABLE = "SUITE_CPU_DIR"
TICK = os.sysconf("SC_CLK_TCK")


# --- the pytest plugin (loaded in the controller and the workers with -p benchmarks.suite_cpu) ---


def _log_test(nodeid: str, kind: str) -> None:
    folder = os.environ.get(DIR_VARIABLE)
    if folder:
        with open(Path(folder) / "tests.log", "a") as log:
            log.write(f"{time.time():.2f} {os.environ.get('PYTEST_XDIST_WORKER', 'main')} {kind} {nodeid}\n")


def pytest_configure(config):
    """A worker's own environment in /proc is the one it was started with, before pytest-xdist named it:
    it says which process it is here."""
    folder, worker = os.environ.get(DIR_VARIABLE), os.environ.get("PYTEST_XDIST_WORKER")
    if folder and worker:
        with open(Path(folder) / "workers.log", "a") as log:
            log.write(f"{os.getpid()} {worker}\n")


def pytest_runtest_logstart(nodeid, location):
    _log_test(nodeid, "start")


def pytest_runtest_logfinish(nodeid, location):
    _log_test(nodeid, "end")


# --- the sampler ---


def _worker_of(pid: int) -> str | None:
    try:
        environment = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environment.split(b"\0"):
        if item.startswith(b"PYTEST_XDIST_WORKER="):
            return item.split(b"=", 1)[1].decode()
    return "-"


def _stat_of(pid: int) -> tuple[int, int, int] | None:
    """(CPU ticks, start time, parent) of a process, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[1])


def _descendants() -> dict[int, tuple[int, int]]:
    """This process's descendants (orphans included: they are reparented here): pid -> (CPU ticks, start)."""
    stats = {int(name): stat for name in os.listdir("/proc") if name.isdigit() and (stat := _stat_of(int(name)))}
    children = collections.defaultdict(list)
    for pid, (_, _, parent) in stats.items():
        children[parent].append(pid)
    found, todo = {}, list(children[os.getpid()])
    while todo:
        pid = todo.pop()
        found[pid] = stats[pid][:2]
        todo.extend(children[pid])
    return found


def process_kind(pid: int) -> str | None:
    """What a process is, from its command line: the report's "by process kind" (None once it is gone)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return None
    if not argv:
        return "?"
    # Chromium writes its whole command line into argv[0]: the program is its first word.
    line, program = " ".join(argv), os.path.basename(argv[0].split(" ")[0])
    where = "emulated runtime: " if "databricks_environments/" in line else ""  # the emulator's environments
    if "chrom" in program:
        return "Chromium"
    if program == "java":
        return where + ("JVM, Spark Connect server" if "SparkConnectServer" in line else "JVM")
    if not program.startswith("python"):
        return where + program
    for marker, kind in (("pyspark.daemon", "Spark Python worker"), ("pyspark.worker", "Spark Python worker"),
                         ("databricks_emulator.runner", "task (Python)")):
        if marker in line:
            return where + kind
    arguments = iter(argv[1:])
    for argument in arguments:  # the interpreter's options, then what it runs
        if argument == "-c":
            return where + "python -c"
        if argument == "-m":
            return where + f"python -m {next(arguments, '')}"
        if argument in ("-X", "-W"):
            next(arguments, None)
        elif not argument.startswith("-"):
            script = os.path.basename(argument)
            if script == "pytest":
                return "pytest (controller)"
            if script == "dagster":  # its command: "dagster asset", "dagster dev", "dagster api"
                return f"dagster {next(arguments, '')}".strip()
            return where + f"python {script}"
    return where + "python"


def sample(out: Path, stop: threading.Event) -> None:
    """Write tab-separated "time worker kind cpu-seconds" lines: the CPU since the previous sample of each
    worker's processes of one kind (`process_kind`)."""
    seen: dict[tuple[int, int], tuple[int, str, str]] = {}
    workers_log = out.with_name("workers.log")
    with open(out, "w") as log:
        while not stop.wait(0.25):
            now, by_worker, alive = time.time(), collections.Counter(), set()
            lines = workers_log.read_text().split() if workers_log.exists() else []
            workers = {int(pid): name for pid, name in zip(lines[::2], lines[1::2], strict=True)}
            for pid, (cpu, started) in _descendants().items():
                key = (pid, started)
                alive.add(key)
                before, worker, kind = seen.get(key) or (0, _worker_of(pid) or "-", "?")
                worker = workers.get(pid, worker)
                # Again each time: a process may exec another program.
                kind = "pytest-xdist worker" if pid in workers else process_kind(pid) or kind
                seen[key] = (cpu, worker, kind)
                by_worker[(worker, kind)] += (cpu - before) / TICK
            seen = {key: value for key, value in seen.items() if key in alive}
            log.writelines(f"{now:.2f}\t{worker}\t{kind}\t{cpu:.2f}\n" for (worker, kind), cpu in by_worker.items() if cpu)


# --- the report ---


def _test_spans(folder: Path) -> dict[str, list[tuple[float, float, str]]]:
    spans, started = collections.defaultdict(list), {}
    for line in (folder / "tests.log").read_text().splitlines():
        at, worker, kind, nodeid = line.split(" ", 3)
        if kind == "start":
            started[(worker, nodeid)] = float(at)
        elif (worker, nodeid) in started:
            spans[worker].append((started.pop((worker, nodeid)), float(at), nodeid))
    return {worker: sorted(items) for worker, items in spans.items()}


def report(folder: Path, bin_seconds: float = 30) -> str:
    spans = _test_spans(folder)
    starts = {worker: [s for s, _, _ in items] for worker, items in spans.items()}
    per_test, outside, busy, first = collections.Counter(), collections.Counter(), collections.Counter(), None
    kinds = collections.Counter()
    for line in (folder / "sampler.log").read_text().splitlines():
        at, worker, kind, cpu = line.split("\t")
        at, cpu = float(at), float(cpu)
        kinds[kind] += cpu
        first = first or at
        busy[int((at - first) // bin_seconds)] += cpu
        index = bisect.bisect_right(starts.get(worker, []), at) - 1
        if index >= 0 and at <= spans[worker][index][1] + 0.5:
            per_test[spans[worker][index][2]] += cpu
        else:
            outside[worker] += cpu
    modules = collections.Counter()
    for nodeid, cpu in per_test.items():
        modules[nodeid.split("::")[0].rpartition("/")[2]] += cpu
    lines = [f"CPU-s in tests {sum(per_test.values()):.0f}; outside them, by worker: "
             + ", ".join(f"{w} {c:.0f}" for w, c in outside.most_common()), "", "by module:"]
    lines += [f"{cpu:8.1f}  {module}" for module, cpu in modules.most_common()]
    lines += ["", "by process kind (all processes, the install's included):"]
    lines += [f"{cpu:8.1f}  {kind}" for kind, cpu in kinds.most_common()]
    lines += ["", "by test (top 40):"] + [f"{cpu:8.1f}  {nodeid}" for nodeid, cpu in per_test.most_common(40)]
    lines += ["", f"busy cores per {bin_seconds:.0f} s:"]
    lines += [f"{index * bin_seconds:6.0f} s  {busy[index] / bin_seconds:4.2f}" for index in range(max(busy, default=-1) + 1)]
    return "\n".join(lines)


def run_reaping(command: list[str], **popen) -> tuple[int | None, float]:
    """Run `command` as a child subreaper that reaps every orphan at once, as init does (a zombie left
    standing would still look alive to the tests that kill a process group), and waits for the orphans
    that outlive the command (a JVM), so that RUSAGE_CHILDREN counts the whole tree. (exit status, wall)."""
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans are reparented here
    started, child, status, wall = time.monotonic(), subprocess.Popen(command, **popen), None, float("nan")
    while True:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        if pid == child.pid:
            status, wall = os.waitstatus_to_exitcode(code), time.monotonic() - started
    child.returncode = status
    return status, wall


def run(folder: Path, command: list[str], env: dict[str, str] | None = None, **popen) -> int:
    """Run `command` (with `env` or this process's environment, and Popen's `popen`) sampled; write the
    report. Its exit status."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tests.log").write_text("")
    (folder / "workers.log").write_text("")
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(folder / "sampler.log", stop), daemon=True)
    sampler.start()
    env = dict(os.environ if env is None else env)
    addopts = f"{env.get('PYTEST_ADDOPTS', '')} -p benchmarks.suite_cpu".strip()
    repository = str(Path(__file__).resolve().parent.parent)
    env |= {DIR_VARIABLE: str(folder), "PYTEST_ADDOPTS": addopts,
            "PYTHONPATH": os.pathsep.join(filter(None, [repository, env.get("PYTHONPATH")]))}
    status, wall = run_reaping(command, env=env, **popen)
    stop.set()
    sampler.join()
    tree = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = f"{' '.join(command)}: exit {status}, {wall:.0f} s wall, tree CPU {tree.ru_utime + tree.ru_stime:.0f} s\n\n"
    (folder / "report.txt").write_text(text + report(folder))
    print(text + f"report: {folder / 'report.txt'}")
    return status if status is not None else 1


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not arguments or arguments[0].startswith("-"):
        sys.exit(__doc__)
    out, rest = Path(arguments[0]), arguments[1:]
    sys.exit(run(out, rest[1:] if rest[:1] == ["--"] else rest or [".venv/bin/pytest"]))
