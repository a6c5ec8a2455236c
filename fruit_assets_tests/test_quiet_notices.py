"""TensorFlow's notices that TF_CPP_MIN_LOG_LEVEL does not reach are dropped from the driver's stderr, and
nothing else is (quiet.without_tensorflow_notices)."""

import subprocess
import sys

SCRIPT = r"""
import os, sys
from fruit_assets import quiet
os.write(2, b"before\n")
with quiet.without_tensorflow_notices():
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
    os.write(2, b"I0000 00:00:1.2   7 port.cc:153] oneDNN custom operations are on. You may see ...\n")
    os.write(2, b"a real warning\n")
os.write(2, b"after\n")
"""


def run(**env) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_tensorflow_notices_are_dropped_and_every_other_line_kept():
    assert run(PATH="/usr/bin").splitlines() == ["before", "a real warning", "after"]


def test_verbose_keeps_the_notices():
    lines = run(PATH="/usr/bin", FRUIT_VERBOSE="1").splitlines()
    assert len(lines) == 5 and any("oneDNN custom operations are on" in line for line in lines)
