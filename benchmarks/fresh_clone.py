"""Issue 21's measurement: the README's test command from a fresh clone, with what CI starts with.

    python -m benchmarks.fresh_clone NAME [--commit REV] [--remove-chromium] [--profile] [--user-caches]
                                          [--results FILE] [-- PYTEST_ARGS ...]

Clones this repository (HEAD, or REV) into /tmp/fresh/NAME, points the uv, pip, emulator and model caches
at an empty folder there (a newcomer's machine; `--user-caches` keeps ~/.cache, as a second clone has), and
runs `bash .ci/run` with CI=true as a child subreaper that reaps every orphan, so that JVMs which outlive
their parent are counted in the tree's CPU. `--remove-chromium` purges Debian's chromium first, with what it
pulled in and apt's downloads, as a new machine has none (the UI tests install it in the background).
PYTEST_ARGS, if given, are passed through PYTEST_ADDOPTS (for example `-n 3` to compare worker counts side by side).

Prints, and appends to --results: the commit, the tests' closing line, pytest's own time, the README
command's wall time (install included), the tree's CPU, the machine's busy and steal CPU over the run,
and the CPU model. Compare rows only within one machine and one session (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import suite_cpu
from benchmarks.common import REPO_ROOT, busy_cpu_seconds, machine_info, steal_cpu_seconds

NEEDED_GB = 12


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--remove-chromium", action="store_true")
    parser.add_argument("--results", default="/tmp/fresh/results.txt")
    parser.add_argument("--profile", action="store_true", help="sample it with benchmarks.suite_cpu")
    parser.add_argument("--user-caches", action="store_true",
                        help="keep this user's caches (~/.cache: uv's, the emulator's wheels), as a second clone has")
    options = parser.parse_args(argv)

    folder = Path("/tmp/fresh") / options.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # A clone with its venv, caches and emulated runtimes takes about 9 GB. On a full disk SeaweedFS answers
    # InternalError and tests fail in ways that look like bugs (F11, G3 in BENCHMARKS.md): refuse instead.
    free_gb = shutil.disk_usage(folder).free / 1e9
    if free_gb < NEEDED_GB:
        sys.exit(f"{free_gb:.0f} GB free under {folder}, and a fresh clone's run needs about {NEEDED_GB}: "
                 "remove earlier clones (/tmp/fresh/*) first")
    clone, caches = folder / "repo", folder / "cache"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", options.commit], check=True)
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    if options.remove_chromium and shutil.which("chromium"):
        # And the packages it pulled in, and apt's downloads: a new machine has neither.
        for command in (["apt-get", "purge", "-y", "-q", "chromium", "chromium-driver", "chromium-common"],
                        ["apt-get", "autoremove", "-y", "-q", "--purge"], ["apt-get", "clean"]):
            subprocess.run(command, check=True, capture_output=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST_", "FRUIT_"))}
    env["CI"] = "true"
    if not options.user_caches:
        env.update(XDG_CACHE_HOME=str(caches), UV_CACHE_DIR=str(caches / "uv"), PIP_CACHE_DIR=str(caches / "pip"))
    if passthrough:
        env["PYTEST_ADDOPTS"] = " ".join(passthrough)

    busy0, steal0 = busy_cpu_seconds(), steal_cpu_seconds()
    with open(folder / "log.txt", "wb") as log:
        output = {"cwd": clone, "env": env, "stdout": log, "stderr": subprocess.STDOUT}
        if options.profile:  # sampled by benchmarks.suite_cpu: its report is NAME/profile/report.txt
            start = time.monotonic()
            status = suite_cpu.run(folder / "profile", ["bash", ".ci/run"], **output)
            wall = time.monotonic() - start
        else:
            status, wall = suite_cpu.run_reaping(["bash", ".ci/run"], **output)
    busy1, steal1 = busy_cpu_seconds(), steal_cpu_seconds()
    machine = machine_info()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)

    text = (folder / "log.txt").read_text(errors="replace")
    closing = re.findall(r"^=+ (.*(?:passed|failed|error).*) in ([\d.]+)s", text, re.M)
    summary, pytest_seconds = closing[-1] if closing else ("no closing line", "nan")
    line = (f"{options.name}\t{commit}\texit {status}\t{summary}\tpytest {float(pytest_seconds):.0f} s\t"
            f"README command {wall:.0f} s ({wall / 60:.1f} min)\ttree CPU {usage.ru_utime + usage.ru_stime:,.0f} s\t"
            f"machine busy {busy1 - busy0:,.0f} s, steal {steal1 - steal0:.0f} s\t"
            f"{' '.join(passthrough) or 'addopts as committed'}\t{'user' if options.user_caches else 'empty'} caches\t"
            f"{machine['cpu']} ({machine['cpu_id']}, {machine['cores']} cores; {machine['vector_flags']})")
    print(line)
    with open(options.results, "a") as results:
        results.write(line + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
