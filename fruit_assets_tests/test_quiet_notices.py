"""TensorFlow's notices that TF_CPP_MIN_LOG_LEVEL does not reach are dropped from the driver's stderr, and
nothing else is (quiet.without_tensorflow_notices)."""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import os, sys
from fruit_assets.plumbing import quiet
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


@pytest.mark.slow
def test_the_demos_first_model_build_prints_no_tensorflow_notice(tmp_path):
    """What the README's demo does first, offline: try to build the ImageNet model (Keras builds it, then
    fails to download the weights). On a CPU where oneDNN is on (AVX-512), TensorFlow printed its notice
    there, twice, whatever TF_CPP_MIN_LOG_LEVEL said."""
    script = (
        "from fruit_assets.plumbing import quiet; quiet.configure_environment()\n"
        "from fruit_assets.ml.model import WeightsSource, WeightsUnavailableError, build_feature_extractor\n"
        "try:\n    build_feature_extractor(WeightsSource('imagenet'))\nexcept WeightsUnavailableError:\n    pass\n"
        "import keras, numpy\n"
        "keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3))(numpy.zeros((1, 96, 96, 3)))\n"
        "print('built')\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("TF_")}
    env["KERAS_HOME"] = str(tmp_path)  # no cached ImageNet weights
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and "built" in done.stdout, done.stderr[-3000:]
    notices = [line for line in done.stderr.splitlines() if "oneDNN custom operations" in line or "absl::InitializeLog" in line]
    assert not notices, done.stderr


# What `spark_session` relies on, with a shell standing in for the JVM: a process started while the session
# is made keeps the filter as its stderr after that, and only the JDK's incubator line is dropped from it.
CHILD_SCRIPT = r"""
import os, subprocess, sys, time
from fruit_assets.plumbing import quiet
jdk_line = quiet.JVM_INCUBATOR_LINE.decode()
with quiet._stderr_through(quiet._without_jvm_boot_line, wait_seconds=0):
    child = subprocess.Popen(["sh", "-c", f"echo booting >&2; echo '{jdk_line}' >&2; sleep 0.5; echo later >&2"])
    os.write(2, b"inside\n")
os.write(2, b"after\n")
child.wait()
time.sleep(0.2)  # the filter's thread copies what the child wrote last
"""


def test_a_process_started_in_the_filter_keeps_it_and_loses_only_the_jvm_line():
    done = subprocess.run([sys.executable, "-c", CHILD_SCRIPT], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert sorted(lines) == ["after", "booting", "inside", "later"], done.stderr
    assert lines.index("booting") < lines.index("later") and lines[-1] == "later"

