"""The pipeline's Spark code on Spark Connect, as serverless compute and Unity Catalog standard access
mode run it: no SparkContext, no RDD API, no broadcast variables, no accumulators.

One local Spark Connect server per module, in a subprocess of its own (a classic session with Spark's
Connect plugin, as `SparkSession.builder.remote("local[2]")` would start, but not in this process: that
refuses to start beside the classic `spark` fixture's SparkContext, SESSION_OR_CONTEXT_EXISTS). This
process talks to it as a Connect client. Featurization and the PCA statistics run on both sessions
over the same inputs, and must agree.

One catch of running both in one process: pyspark's functions (`F.col`, `pandas_udf`, ...) build Connect
or classic objects by a process-wide flag (`pyspark.sql.utils.is_remote()`, the environment variable
SPARK_CONNECT_MODE_ENABLED), which a Connect-only process (serverless) always has. `connect_mode()`
sets it only while the Connect side runs, so the classic tests that share this worker are unaffected.
"""

import os
import socket
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from fruit_assets.ml.pca import FeatureStatistics, feature_statistics
from fruit_assets.plumbing.spark_connect import default_parallelism, is_connect

FIXTURE = Path(__file__).parent / "data" / "spark_ml_pca_wrong_features.npy"
DIMENSIONS = 1280  # the fixture's vectors: MobileNetV2 features
CONNECT_FLAG = "SPARK_CONNECT_MODE_ENABLED"

SERVER = textwrap.dedent(
    """
    import json, sys
    from pyspark.sql import SparkSession

    builder = SparkSession.builder
    for key, value in json.loads(sys.argv[1]).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    print("ready", flush=True)
    sys.stdin.read()  # until the test process closes the pipe, or dies
    spark.stop()
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def connect_mode():
    """pyspark's functions build Connect objects inside, classic ones outside (see the module doc)."""
    before = os.environ.get(CONNECT_FLAG)
    os.environ[CONNECT_FLAG] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(CONNECT_FLAG, None)
        else:
            os.environ[CONNECT_FLAG] = before


@pytest.fixture(scope="module")
def spark_connect(spark, tmp_path_factory):
    """A Spark Connect session on a local server (local[2], the test JVM options, Python workers with
    this interpreter and the `spark` fixture's environment)."""
    import json

    from pyspark.sql.connect.session import SparkSession as ConnectSession

    from fruit_assets.resources import local_spark_config

    port = _free_port()
    config = local_spark_config() | {
        "spark.master": "local[2]",
        "spark.ui.enabled": "false",
        "spark.plugins": "org.apache.spark.sql.connect.SparkConnectPlugin",
        "spark.connect.grpc.binding.address": "127.0.0.1",
        "spark.connect.grpc.binding.port": str(port),
    }
    log = tmp_path_factory.mktemp("spark_connect") / "server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, json.dumps(config)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=output, text=True
        )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # "ready", or "" if the server died
        assert line.strip() == "ready", f"the Spark Connect server did not start:\n{log.read_text()[-3000:]}"
        session = ConnectSession.builder.remote(f"sc://127.0.0.1:{port}").create()  # sets no process-wide flag
        yield session
        session.stop()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_connect_refuses_the_apis_the_pipeline_no_longer_uses(spark_connect):
    """What serverless would refuse, this session refuses too: the tests below would catch a return
    of SparkContext, RDD, broadcast or accumulator use."""
    from pyspark.errors import PySparkAttributeError, PySparkNotImplementedError

    assert is_connect(spark_connect)
    with pytest.raises(PySparkAttributeError, match="sparkContext"):
        spark_connect.sparkContext  # noqa: B018 - the attribute access is what raises
    with connect_mode():
        frame = spark_connect.range(4)
        with pytest.raises(PySparkNotImplementedError, match="rdd"):
            frame.rdd  # noqa: B018 - what the PCA's treeReduce needed


def test_default_parallelism_on_connect(spark_connect, monkeypatch):
    import fruit_assets.plumbing.spark_connect as compat

    with connect_mode():
        assert default_parallelism(spark_connect) == 2  # from the master URL, local[2]
        # Where the URL does not say (local[*] counts the server's cores; a cluster): one small job.
        monkeypatch.setattr(compat, "master", lambda spark: "")
        assert default_parallelism(spark_connect) == 2


@pytest.fixture(scope="module")
def features_matrix() -> np.ndarray:
    return np.load(FIXTURE)


@pytest.fixture(scope="module")
def features_table(tmp_path_factory, features_matrix):
    """An image_features Delta table holding the fixture matrix in three data files."""
    from deltalake import write_deltalake

    from fruit_assets.storage import delta, resolve

    folder = tmp_path_factory.mktemp("connect_features") / "image_features"
    for part in np.array_split(np.arange(len(features_matrix)), 3):
        table = pa.table(
            {
                "path": [f"/images/label{i % 24}/{i:03d}.jpg" for i in part],
                "label": [f"label{i % 24}" for i in part],
                "features": pa.array(list(features_matrix[part]), type=pa.list_(pa.float32())),
            }
        )
        write_deltalake(str(folder), table, mode="append")
    return delta.snapshot(resolve(str(folder)))


def _statistics(session, snapshot) -> FeatureStatistics:
    """The PCA statistics as pca_model computes them in a full pass (incremental._full)."""
    from fruit_assets.storage import spark_io

    return feature_statistics(spark_io.read_table(session, snapshot, columns=["features"]), DIMENSIONS)


def test_pca_statistics_on_connect_equal_classic_spark_and_numpy(spark, spark_connect, features_table, features_matrix):
    classic = _statistics(spark, features_table)
    with connect_mode():
        connect = _statistics(spark_connect, features_table)
    expected = FeatureStatistics.of(features_matrix)
    # The same data files give the same partitions, summed in the same order: the same bits.
    assert connect.rows == classic.rows == len(features_matrix)
    np.testing.assert_array_equal(connect.sums, classic.sums)
    np.testing.assert_array_equal(connect.gram, classic.gram)
    # And both are numpy's float64 sums, up to the order of the additions.
    np.testing.assert_allclose(connect.sums, expected.sums, rtol=1e-12, atol=1e-12 * np.abs(expected.sums).max())
    np.testing.assert_allclose(connect.gram, expected.gram, rtol=1e-12, atol=1e-12 * np.abs(expected.gram).max())


def test_pca_statistics_are_summed_in_partition_order(spark_connect, features_matrix):
    """Seven partitions, of a frame built on the client: still numpy's sums, and an empty frame sums
    to zeros (what the treeReduce returned for no partitions)."""
    rows = [(f"img/{i:03d}.jpg", row.tolist()) for i, row in enumerate(features_matrix)]
    with connect_mode():
        frame = spark_connect.createDataFrame(rows, "path string, features array<float>")
        many = feature_statistics(frame.repartition(7, "path").sortWithinPartitions("path"), DIMENSIONS)
        again = feature_statistics(frame.repartition(7, "path").sortWithinPartitions("path"), DIMENSIONS)
        empty = feature_statistics(frame.limit(0), DIMENSIONS)
    expected = FeatureStatistics.of(features_matrix)
    np.testing.assert_allclose(many.gram, expected.gram, rtol=1e-12, atol=1e-12 * np.abs(expected.gram).max())
    np.testing.assert_array_equal(many.gram, again.gram)  # the order of the additions is fixed
    assert empty.rows == 0 and not empty.gram.any() and empty.gram.shape == (1280, 1280)


@pytest.fixture(scope="module")
def prepared_model():
    """The random:0 model, converted to ONNX as the image_features asset prepares it."""
    from fruit_assets.ml.featurize import FeaturizeSettings, prepare_feature_extractor
    from fruit_assets.resources import FeatureModel
    from fruit_assets_tests.support import TEST_WEIGHTS

    return prepare_feature_extractor(FeatureModel(weights=TEST_WEIGHTS).weights_source(), FeaturizeSettings())


def _featurize(session, paths: list[str], model) -> tuple[pd.DataFrame, object]:
    from fruit_assets.ml.featurize import FeaturizeSettings, WorkerModelSetup, featurize
    from fruit_assets.plumbing.spark_progress import reporting_progress

    images = session.createDataFrame(pd.DataFrame({"path": paths, "label": [Path(p).parent.name for p in paths]}))
    setup = WorkerModelSetup(session)
    frame = featurize(images, model.payload, model.fingerprint, FeaturizeSettings(), partitions=2, model_setup=setup)
    notes: list[str] = []
    with reporting_progress(session, len(paths), lambda *args: None, every_seconds=0.2, note=notes.append):
        result = frame.toPandas().sort_values("path", ignore_index=True)
    return result, (setup, notes)


def test_featurization_on_connect_equals_classic_spark(spark, spark_connect, demo_images, prepared_model):
    paths = sorted(str(p) for p in Path(demo_images).glob("*/*"))[:24]
    classic, (classic_setup, classic_notes) = _featurize(spark, paths, prepared_model)
    with connect_mode():
        connect, (connect_setup, connect_notes) = _featurize(spark_connect, paths, prepared_model)
    assert list(connect.path) == list(classic.path) == paths
    assert connect.error.isna().all() and classic.error.isna().all()
    actual, expected = np.stack(connect.features), np.stack(classic.features)
    assert actual.shape == (24, 1280)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
    assert np.abs(actual[0] - actual[-1]).max() > 1e-2  # different images, different vectors

    # The workers' model set-up time: accumulators on classic, not measured (and said so) on Connect.
    assert classic_setup.measured and not connect_setup.measured
    assert connect_setup.built() == 0 and connect_setup.per_worker() == 0.0
    assert "Spark Connect" in connect_setup.NOT_MEASURED
    # Progress: a status tracker on classic; on Connect a note, once, and the actions ran under a tag.
    assert classic_notes == []
    [note] = connect_notes
    assert "not reported on Spark Connect" in note and "fruit-progress-" in note
    assert spark_connect.getTags() == set()  # the tag is removed afterwards


def test_pca_model_written_on_connect_loads_as_a_spark_ml_model_on_classic_spark_only(spark, spark_connect, features_table, tmp_path):
    """A PCAModel is rebuilt from the components table when loaded (pca_store): in the JVM of a classic
    session; a Connect session has none, and is told to load a PcaResult instead."""
    from pyspark.ml.feature import PCAModel

    from fruit_assets.ml.pca import PcaResult, decompose
    from fruit_assets.ml.pca_store import PcaHandler, statistics_folder
    from fruit_assets.storage import delta, resolve

    table = resolve(str(tmp_path / "pca_model"))
    with connect_mode():
        result = decompose(_statistics(spark_connect, features_table), 10, 0.95, 256)
        PcaHandler().store(result, table, None, {}, delta.CommitAttempts())
        snapshot = delta.snapshot(table)
        assert snapshot is not None
        with pytest.raises(TypeError, match="Spark Connect session .* does not have; load pca_model as a PcaResult"):
            PcaHandler().load(snapshot, PCAModel)
        assert np.array_equal(PcaHandler().load(snapshot, PcaResult).components, result.components)
    assert statistics_folder(snapshot)  # the statistics are stored as on classic
    assert sorted(p.name for p in (tmp_path / "pca_model").iterdir() if p.name.startswith("_")) == ["_delta_log", "_statistics"]
    model = PcaHandler().load(snapshot, PCAModel)
    assert model.getK() == result.k
    np.testing.assert_array_equal(model.pc.toArray().T, result.components)


def test_the_classic_session_still_works_beside_it(spark, spark_connect):
    """The process-wide flag is off again outside `connect_mode`: classic code builds classic objects."""
    from pyspark.sql import functions as F

    assert os.environ.get(CONNECT_FLAG) is None
    assert not is_connect(spark)
    assert spark.range(3).select(F.sum("id")).first()[0] == 3
