"""A newcomer's first hour (issue 16): the demo and a CLI run print no known-harmless start-up noise, the
demo's screen stays short, and `dagster dev` on the demo's instance shows its four materializations and
their plots.

One demo run (a subprocess, as a user runs it: the session fixture `demo`) serves the tests here and in
test_ui, which shows it in `dagster dev`; the CLI run reuses its storage and instance, so it is an
incremental run: quick, but it starts the Spark JVM and workers again.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.spark

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 15 * 60  # the machine may be busy
MAX_DEMO_LINES = 15

# Known-harmless messages of the libraries the pipeline starts: none may reach the user's screen.
NOISE = [
    # TensorFlow's and absl's C++ start-up INFO lines.
    r"oneDNN custom operations are on",
    r"This TensorFlow binary is optimized",
    r"All log messages before absl::InitializeLog\(\)",
    r"cpu_feature_guard",
    r"Unable to register cu(DNN|FFT|BLAS) factory",
    r"TF-TRT Warning",
    # Spark's log4j start-up lines, and the JVM's.
    r"Using Spark's default log4j profile",
    r"Setting default log level",
    r"To adjust logging level use sc\.setLogLevel",
    r"Unable to load native-hadoop library",
    r"NativeCodeLoader",
    r"Using incubator modules",
    r"replaced a previously registered data source",
    r"netlib-blas|JNI_OnLoad|dev\.ludovic\.netlib",
    # Progress bars (Keras' download and predict bars, Spark's console progress).
    r"\[Stage \d+:",
    r"━━━━",
    r"\d+/\d+ \[=+",
]
NOISE_RE = re.compile("|".join(f"(?:{pattern})" for pattern in NOISE))
SUMMARY_ASSETS = ("raw_images", "image_features", "pca_model", "reduced_features")


def noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if NOISE_RE.search(line)]


def test_the_demo_prints_a_short_summary_and_no_noise(demo):
    env, stdout, stderr = demo
    print(stdout + stderr)
    assert not noise(stdout + stderr), noise(stdout + stderr)
    lines = [line for line in (stdout + stderr).splitlines() if line.strip()]
    assert len(lines) <= MAX_DEMO_LINES, f"{len(lines)} non-empty lines:\n" + "\n".join(lines)
    summary = stdout.splitlines()
    assert any(line.startswith("fruit_assets demo: 4 assets materialized in") for line in summary)
    [time_line] = [line for line in summary if line.strip().startswith("time ")]
    assert re.search(r"start-up \S+ s .*model set-up \S+ s, featurization \S+ s \(\d+ images/s\), the rest \S+ s", time_line)
    for name in SUMMARY_ASSETS:
        assert any(line.strip().startswith(name) for line in summary), name
    assert "NOT meaningful" in stdout  # random weights: said once, in the summary
    assert "featurizing with random:0" not in stdout + stderr  # ... not a second time
    # The last line says how to open the run in the UI, on this instance.
    assert summary[-1].startswith("open them in the Dagster UI"), summary[-1]
    assert f"DAGSTER_HOME={env['DAGSTER_HOME']}" in summary[-1] and "dagster dev" in summary[-1]
    assert (Path(env["DAGSTER_HOME"]) / "dagster.yaml").exists()


def test_a_cli_run_has_no_java_or_tensorflow_start_up_noise(demo):
    env, _, _ = demo
    dagster = Path(sys.executable).with_name("dagster")
    done = subprocess.run(
        [str(dagster), "asset", "materialize", "-m", "fruit_assets.definitions", "--select", "*"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-8000:]
    assert "RUN_SUCCESS" in log
    assert not noise(log), noise(log)
