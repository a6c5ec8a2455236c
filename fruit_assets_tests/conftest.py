"""Shared test fixtures: one local Spark session, one S3 server and one demo image set per test session
(helpers the tests import are in `support`).

Everything is real: local Spark, TensorFlow, Dagster runs, files on disk. The model runs with the
deterministic random initialisation (`random:0`) because ImageNet weights cannot be downloaded here.
"""

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

# The test command installs without compiling bytecode (the README's `uv pip install` has no
# `--compile-bytecode` there): compiling all of site-packages took 29 CPU-s and 15 s before the first test
# (2-core AMD EPYC, Zen 3: BENCHMARKS.md, P19), for 12,850 files of which a whole run imports 5,914. The
# suite's processes write the bytecode of what they import instead, each file once (Python writes it
# atomically, so parallel workers may race), even where PYTHONDONTWRITEBYTECODE is set, as on these
# machines: without that, every process would compile dagster, pandas, pyspark... from source at each
# start. Set here, before pytest-xdist starts the workers, so that they and everything the tests start
# inherit it. (The emulated runtimes' tasks do the same.)
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Set before any SparkContext starts (see resources.build_resources for why).
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ["PYSPARK_PYTHON"] = sys.executable
# Tests must not pick up a developer's settings, nor ever reach a real AWS account.
for name in list(os.environ):
    if name.startswith(("FRUIT_", "AWS_", "DATABRICKS_")):
        del os.environ[name]
# Every JVM of the tests (the session's, and those of CLI runs, the workspace emulator's tasks, dagster
# dev's runs) lives for seconds, where HotSpot's optimizing compiler (C2) costs more CPU than it saves:
# C1 only and the serial collector took a CLI graph run from 34 to 25 CPU-seconds on 2 cores (AMD EPYC,
# AVX-512). The JIT does not change results. Users' JVMs keep the defaults. The demo run of the tests,
# which checks what a user sees, gets them through SPARK_SUBMIT_OPTS instead (see the `demo` fixture).
# They also skip verifying the bytecode of the jars (pyspark's own, from its wheel: verification only
# rejects malformed class files, and changes nothing else). The emulated runtimes' JVMs cannot use the
# class archive below (another class path), and verification was a fifth of their start-up: a Spark session of an emulated
# 17.3 runtime that starts, runs one job and stops took 10.0 CPU-s with it and 8.0 without (5 runs
# each, interleaved, 2-core Intel Xeon, AVX-512); with the archive, 5.9 and 5.7.
TEST_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:+UnlockDiagnosticVMOptions -XX:-BytecodeVerificationRemote"
# A whole-suite run also gives them a class-data-sharing archive of Spark's classes (`jvm_archive`), which
# the run's first process builds in the background and names here for the parallel workers it starts.
JVM_ARCHIVE_VARIABLE = "PYTEST_FRUIT_JVM_CLASS_ARCHIVE"


def _test_java_options() -> str:
    from fruit_assets_tests import jvm_archive

    archive = os.environ.get(JVM_ARCHIVE_VARIABLE)
    return f"{TEST_JAVA_OPTIONS} {jvm_archive.java_options(Path(archive))}" if archive else TEST_JAVA_OPTIONS


os.environ["JDK_JAVA_OPTIONS"] = _test_java_options()

from fruit_assets_tests.support import TEST_BUCKET, TEST_WEIGHTS, local_resources, materialize_all  # noqa: E402 - after the clean-up above

# Markers by what a test needs, so that a fast tier can leave the heavy parts out:
#   pytest -m "not (spark or s3 or databricks or ui or slow)"     # under a minute
MARKERS = {
    "spark": "runs local Spark (the session fixture, or a Dagster run in a subprocess)",
    "s3": "needs the local S3 server (SeaweedFS)",
    "databricks": "runs steps through the local Databricks workspace emulator",
    "ui": "drives the Dagster UI in headless Chromium",
    "slow": "builds TensorFlow models or converts them: seconds to minutes",
}
_BY_FIXTURE = {"spark": "spark", "spark_connect": "spark", "demo_run": "spark", "local_run_storage": "spark", "s3": "s3",
               "emulator": "databricks"}
# Modules that need more than their fixtures show mark themselves (`pytestmark`), so that a renamed
# module keeps its marks.


def pytest_configure(config):
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist starts the workers, which inherit the environment
def pytest_sessionstart(session):
    """A run of the whole suite starts its slow set-ups in the background at once: Chromium's install
    (for the UI tests), the JVM class archive (for every JVM after it) and the emulated Databricks
    runtimes. A run that names modules or a marker expression naming them builds what it needs when
    it needs it."""
    config = session.config
    if hasattr(config, "workerinput") or config.option.collectonly or not _whole_suite(config):
        return
    shared, marks = config._tmp_path_factory.getbasetemp(), config.option.markexpr or ""
    if "ui" not in marks:
        start_chromium_install(shared)
    if "spark" not in marks:  # the fast tier starts no JVM: an archive would only delay its end
        _start_jvm_archive(shared / "spark_classes.jsa")
    if "databricks" not in marks:
        _start_in_background(_build_emulated_runtimes, shared / EMULATED_RUNTIMES, name="emulated-runtimes")


def _whole_suite(config) -> bool:
    tests = str(Path(config.rootpath, "fruit_assets_tests"))
    return all(str(Path(arg).resolve()) == tests for arg in config.args)


_background: list = []
EMULATED_RUNTIMES = "databricks_environments"  # in the run's shared folder (the `emulated_runtimes` fixture)
REPO = Path(__file__).resolve().parent.parent


def _start_jvm_archive(archive: Path) -> None:
    from fruit_assets_tests import jvm_archive

    os.environ[JVM_ARCHIVE_VARIABLE] = str(archive)
    os.environ["JDK_JAVA_OPTIONS"] = _test_java_options()
    _start_in_background(jvm_archive.build, archive, TEST_JAVA_OPTIONS, name="jvm-class-archive")


def _start_in_background(target, *args, name: str) -> None:
    import threading

    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    _background.append(thread)


def _build_emulated_runtimes(root: Path) -> None:
    """The emulated Databricks runtimes that databricks.yaml's runs need (test_databricks_pipeline), built
    while the other tests run: each needs pyspark's source package built into a wheel and downloads
    (about 70 s from empty caches), which the first Databricks test would otherwise wait for. The
    libraries are those the step launcher submits: the YAML's, and databricks-sdk, which
    dagster-databricks adds at the host's version (DatabricksJobRunner.submit_run)."""
    from importlib.metadata import version

    import yaml

    from fruit_assets.databricks.runtimes import SUPPORTED_RUNTIMES
    from fruit_assets_dev.databricks_emulator.environments import EnvironmentCache, pypi_requirements

    libraries = yaml.safe_load((REPO / "databricks.yaml").read_text())["run_config"]["libraries"]
    requirements, _ = pypi_requirements([*libraries, {"pypi": {"package": f"databricks-sdk=={version('databricks-sdk')}"}}])
    cache = EnvironmentCache(root)
    for runtime in SUPPORTED_RUNTIMES:
        cache.environment(runtime, requirements)
    _build_pipes_runtimes(cache)


def _build_pipes_runtimes(cache) -> None:
    """The environments of test_databricks_pipes: databricks_pipes.yaml's libraries on 17.3 LTS, and the
    serverless file's dependencies with the Spark Connect client the emulator adds (its serverless.py)."""
    import yaml

    from fruit_assets.databricks.runtimes import runtime_for_spark_version
    from fruit_assets_dev.databricks_emulator.serverless import ENVIRONMENT_RUNTIMES, connect_requirement

    classic = yaml.safe_load((REPO / "databricks_pipes.yaml").read_text())
    runtime = runtime_for_spark_version(classic["compute"]["new_cluster"]["spark_version"])
    cache.environment(runtime, tuple(sorted(set(classic["libraries"]))))
    serverless = yaml.safe_load((REPO / "databricks_pipes_serverless.yaml").read_text())
    runtime = runtime_for_spark_version(ENVIRONMENT_RUNTIMES[serverless["compute"]["serverless"]["environment_version"]])
    cache.environment(runtime, tuple(sorted({*serverless["libraries"], connect_requirement(runtime.spark)})))


def pytest_sessionfinish(session):
    for thread in _background:
        thread.join(timeout=300)


# --- Parallel runs (pytest-xdist): which tests share a worker, and in what order they start ---
# A module's tests run on one worker, so that its module fixtures (a workspace emulator, a bucket, a
# dagster dev) start once; modules that share an expensive session fixture form one group. The groups
# start in START_ORDER, then in collection order: the two longest first, so that the run does not end
# waiting for one of them; after them, each Databricks group beside groups that keep both cores busy.
# A Databricks scenario is a chain of processes one after another (the CLI, the emulated task, its JVM)
# that keeps about one core busy (per group, 2-core AMD EPYC Zen 4, BENCHMARKS.md S1: demo 0.59 cores,
# Pipes 0.64, local_run 0.82, against 1.1-1.2 for test_incremental, test_model and test_pca). In the
# previous order Pipes ran beside local_run's step-launcher scenarios, and the machine's two cores were
# 1.2-1.6 busy in much of those three minutes. (Whole runs before and after it took 529 s both, S2 and S3:
# no gain shows at the spread between runs.)
SHARED_GROUPS = {
    "test_quiet": "demo", "test_ui": "demo",  # both use the newcomer's demo run (the `demo` fixture)
    # The tests that read the local run's events (`demo_run`'s result, which cannot be shared with another
    # worker) run beside the first one to publish its tables (`local_run_storage`): one local run, not two.
    "test_databricks_pipeline": "local_run", "test_delta_tables": "local_run", "test_pipeline": "local_run",
}
START_ORDER = (
    "demo", "local_run",  # the longest two: 145 and 310 s
    "test_incremental", "test_model", "test_pca", "test_runtimes",  # beside local_run's Databricks scenarios
    "test_databricks_pipes",  # when local_run ends, beside the next ones
    "test_spark_connect", "test_code_quality", "test_features", "test_bad_input",
    "test_databricks_emulator", "test_faults",
)


def worker_group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
    return SHARED_GROUPS.get(module, module)


def pytest_xdist_make_scheduler(config, log):
    """Tests grouped by `worker_group`, in collection order (pytest-xdist's own `loadgroup` marks do not
    group on pytest 9: it renames items through an attribute that pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    config.option.loadscopereorder = False  # keep START_ORDER (by default: most tests first)
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(items):
    for item in items:
        for name in {_BY_FIXTURE[f] for f in item.fixturenames if f in _BY_FIXTURE}:
            item.add_marker(name)
    rank = {group: index for index, group in enumerate(START_ORDER)}
    items.sort(key=lambda item: rank.get(worker_group(item.nodeid), len(rank)))  # stable: a module keeps its order


def shared_tmp(tmp_path_factory) -> Path:
    """A folder shared by every worker of this pytest run: with pytest-xdist each worker has its own
    base temp folder (popen-gwN) under the run's one; without it, the run's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """ONNX conversions and random weights of this test run go to a fresh folder, not the user's cache:
    every run converts (and checks) the models it uses once. The parallel workers share it: the cache's
    lock makes one of them convert a model while the others wait and read it."""
    folder = shared_tmp(tmp_path_factory) / "model_cache"
    folder.mkdir(exist_ok=True)
    os.environ["FRUIT_MODEL_CACHE"] = str(folder)
    yield folder
    os.environ.pop("FRUIT_MODEL_CACHE", None)


@pytest.fixture(scope="session")
def emulated_runtimes(tmp_path_factory) -> Path:
    """Where the Databricks emulator keeps the emulated runtimes' Python environments: one folder per pytest
    run, shared by its workers, so each (runtime, libraries) environment is built once per run (the
    emulator builds each under a file lock). uv's own cache (~/.cache/uv) makes a rebuild cheap."""
    folder = shared_tmp(tmp_path_factory) / EMULATED_RUNTIMES
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real S3 server (SeaweedFS) per test session, on free loopback ports, with a bucket.

    Its AWS_* settings go into os.environ before Spark starts, because Spark's Python workers
    inherit the environment the JVM was started with: that is how they reach S3 too."""
    from fruit_assets_dev.local_s3 import start_local_s3

    server = start_local_s3(data_dir=str(tmp_path_factory.mktemp("s3")), die_with_parent=True)
    try:
        server.create_bucket(TEST_BUCKET)
        os.environ.update(server.env())
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def spark(s3):
    from pyspark.sql import SparkSession

    from fruit_assets.resources import local_spark_config

    config = local_spark_config() | {"spark.master": "local[2,4]", "spark.ui.enabled": "false"}
    builder = SparkSession.builder
    for key, value in config.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    from fruit_assets_dev.demo_data import generate_demo_set

    root = tmp_path_factory.mktemp("demo_images")
    generate_demo_set(root)  # 24 labels x 3 images, like the original notebook's sample
    return root


@pytest.fixture(scope="session")
def demo(demo_images, tmp_path_factory):
    """`python -m fruit_assets_dev.demo` on the demo set, as a newcomer runs it, into a new DAGSTER_HOME, with a
    fresh model cache (so that it starts TensorFlow to build and convert the model, as a first run does).
    Its instance and storage serve the UI tests and a CLI run after it (test_quiet, test_ui: one group of
    workers' tests). Returns (its environment, stdout, stderr)."""
    base = tmp_path_factory.mktemp("newcomer")
    env = {name: value for name, value in os.environ.items() if not name.startswith(("FRUIT_", "AWS_", "DATABRICKS_"))}
    # Not JDK_JAVA_OPTIONS, for which the java launcher prints a "Picked up" note that a user would not
    # see: spark-submit puts SPARK_SUBMIT_OPTS on the Spark JVM's command line, silently. The options
    # change how fast the JVM starts (its JIT, the class archive), never what the demo prints.
    env["SPARK_SUBMIT_OPTS"] = env.pop("JDK_JAVA_OPTIONS")
    env |= {
        "FRUIT_IMAGES_URI": str(demo_images),
        "FRUIT_STORAGE_URI": str(base / "storage"),
        "FRUIT_MODEL_WEIGHTS": TEST_WEIGHTS,
        "FRUIT_MODEL_CACHE": str(base / "model_cache"),
        "DAGSTER_HOME": str(base / "dagster_home"),  # not made yet: the demo makes it
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),  # the demo is a tool of the checkout (fruit_assets_dev), run from elsewhere here
    }
    done = subprocess.run(
        [sys.executable, "-m", "fruit_assets_dev.demo"], cwd=base, env=env, capture_output=True, text=True, timeout=15 * 60
    )
    assert done.returncode == 0, f"the demo failed:\n{done.stdout}\n{done.stderr}"
    return env, done.stdout, done.stderr


@contextmanager
def _local_run_folder(tmp_path_factory):
    """The run's shared folder of the local run's tables (`demo_run`, `local_run_storage`), held under its
    lock: the worker that publishes them holds it while it runs the graph, and the others wait."""
    import fcntl

    shared = shared_tmp(tmp_path_factory) / "local_run"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield shared


@pytest.fixture(scope="session")
def demo_run(spark, demo_images, tmp_path_factory):
    """The whole graph materialized once on the demo set, for the tests that inspect its outputs and
    events. The first worker to run it publishes its tables for `local_run_storage` (read only from
    then on: tests that write new versions write into a `private_copy`)."""
    with _local_run_folder(tmp_path_factory) as shared:
        if not (shared / "published").exists():
            result = materialize_all(local_resources(demo_images, shared / "storage"))
            (shared / "published").write_text(os.environ.get("PYTEST_XDIST_WORKER", "main"))
            return result, shared / "storage"
    storage = tmp_path_factory.mktemp("storage")
    return materialize_all(local_resources(demo_images, storage)), storage


@pytest.fixture(scope="session")
def local_run_storage(request, tmp_path_factory) -> Path:
    """The tables of a local run of the whole graph on the demo set (`demo_run`'s), for the tests that
    compare another deployment's outputs with it: one run for all the workers, where each ran its own
    (a Spark featurization, a PCA and four Delta commits: about 22 CPU-seconds on 2 cores). Every
    worker generates the same demo set, and the comparisons key rows by <Label>/<file>."""
    with _local_run_folder(tmp_path_factory) as shared:
        published = (shared / "published").exists()
    if not published:
        request.getfixturevalue("demo_run")  # this worker runs it, and publishes it
    return shared / "storage"


# --- Chromium and Playwright, for the UI tests (test_ui) ---

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_PACKAGE = "chromium"  # Debian bookworm
# Without the packages Chromium's dependencies only recommend: 19 packages where apt-get installed 107
# (avahi-daemon, udev, samba's client libraries, Perl's web modules, printer tools, and upgrades of systemd
# and Perl), none of which headless Chromium uses. On 2 cores (AMD EPYC), from apt's download cache:
# 8.5 s and 12 CPU-s of the install, where it took 16 s and 20.
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends"]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

def start_chromium_install(shared: Path) -> None:
    """A run of the whole suite on a machine without Chromium (CI) starts installing it at once, in the
    background, holding the install lock: apt-get mostly waits for downloads, which the UI tests would
    otherwise wait for in the middle of the run. The `chromium` fixture waits for the lock."""
    import fcntl

    if os.path.exists(CHROMIUM) or shutil.which("apt-get") is None or os.geteuid() != 0:
        return
    with open(shared / "chromium.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the child inherits the locked file: held until apt-get ends
        script = f"apt-get update -qq && {' '.join(APT_INSTALL)} -qq {CHROMIUM_PACKAGE}"
        with open(shared / "chromium-install.log", "w") as log:
            subprocess.Popen(["sh", "-c", script], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), pass_fds=(lock.fileno(),),
                             start_new_session=True)


@pytest.fixture(scope="session")
def chromium(tmp_path_factory) -> str:
    """Debian's Chromium, installed with apt-get when missing (needs root, as on CI). One parallel worker
    installs it while any other that needs it waits (apt-get refuses to run twice at once); a whole-suite
    run has already started installing it (`start_chromium_install`) and holds the lock until it is done."""
    import fcntl

    with open(shared_tmp(tmp_path_factory) / "chromium.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _install_chromium()
    return CHROMIUM


def _install_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            pytest.fail(
                f"{CHROMIUM} is missing; install it as root: apt-get update && {' '.join(APT_INSTALL)} {CHROMIUM_PACKAGE}"
            )
        started = time.monotonic()
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for command in (["apt-get", "update"], [*APT_INSTALL, CHROMIUM_PACKAGE]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
            if done.returncode != 0:
                output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
                pytest.fail(f"{' '.join(command)} failed with exit code {done.returncode}:\n{output}")
        print(f"installed {CHROMIUM_PACKAGE} with apt-get in {time.monotonic() - started:.0f} s")
        if not os.path.exists(CHROMIUM):
            pytest.fail(f"apt-get installed {CHROMIUM_PACKAGE} but {CHROMIUM} does not exist")


@pytest.fixture(scope="module")
def browser(chromium):
    """Headless Chromium for the module that drives the UI (test_ui, the only one). Not for the session:
    Playwright's sync API keeps its asyncio loop running in the main thread while it is open, and every
    in-process Dagster run after it on that worker then warned that it could not shut its own event loop
    down (`shutdown_asyncgens` "never awaited", 30 warnings once test_incremental and others ran there)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()
