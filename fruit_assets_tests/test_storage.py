"""Storage URIs, the Delta IO manager and the image catalog, on real files."""

import dataclasses
import json
import os

import pandas as pd
import pyarrow as pa
import pytest
from dagster import AssetKey, PythonObjectDagsterType

from fruit_assets import storage
from fruit_assets.pipeline.listing import list_images
from fruit_assets.resources.io_manager import load_asset
from fruit_assets_tests.support import input_context, io_manager, output_context


def test_resolve_local_paths_and_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("data/x").path == str(tmp_path / "data" / "x")
    assert storage.resolve(f"file://{tmp_path}/y").path == str(tmp_path / "y")
    assert storage.resolve(str(tmp_path)).is_local


def test_resolve_s3_uris():
    location = storage.resolve("s3://bucket/some/prefix/")
    assert (location.uri, location.path, location.is_local) == ("s3://bucket/some/prefix", "bucket/some/prefix", False)
    assert storage.resolve("s3://bucket").path == "bucket"


@pytest.mark.parametrize(
    "uri, fragment",
    [("", "is empty"), ("s3:///prefix", "no bucket"), ("ftp://host/x", "unsupported scheme"), ("s3://b/a/../c", "'..'")],
)
def test_malformed_uris_name_the_setting(uri, fragment):
    with pytest.raises(storage.StorageConfigError, match=fragment) as error:
        storage.resolve(uri, setting="FRUIT_STORAGE_URI")
    assert uri == "" or "FRUIT_STORAGE_URI" in str(error.value)


def test_uri_paths_are_taken_literally():
    # '#', '?', '%' and '+' are ordinary characters in file names, not URL syntax.
    assert storage.resolve("s3://bucket/a #1/100%+x?.jpg").path == "bucket/a #1/100%+x?.jpg"
    assert storage.resolve("/tmp/a#b/c?d.jpg").path == "/tmp/a#b/c?d.jpg"
    assert storage.resolve("file:///tmp/x%20y").path == "/tmp/x%20y"


def test_credentials_in_uris_are_refused_without_echoing_them():
    with pytest.raises(storage.StorageConfigError, match="credentials or ports do not belong") as error:
        storage.resolve("s3://AKIAEXAMPLE:s3cr3t@bucket/prefix", setting="FRUIT_STORAGE_URI")
    assert "s3cr3t" not in str(error.value)


@pytest.mark.parametrize("name", ["..", "../escape", "a/../../b", "/abs", ""])
def test_path_components_cannot_escape_the_root(tmp_path, name):
    with pytest.raises(storage.StorageConfigError):
        storage.resolve(str(tmp_path)).child(name)


def _output(name, run_id="run-1"):
    return output_context(asset_key=AssetKey(name), run_id=run_id)


def test_io_manager_round_trips_pandas_as_delta_versions(tmp_path):
    from deltalake import DeltaTable

    manager = io_manager(tmp_path)
    frame = pd.DataFrame({"path": ["a", "b"], "n": [1, 2], "at": pd.to_datetime(["2026-01-01", "2026-01-02"], utc=True)})
    for expected_version, rows in ((0, frame), (1, frame.iloc[:1])):
        context = _output("table")
        manager.handle_output(context, rows)
        metadata = context.get_logged_metadata()
        assert metadata["delta_version"].value == expected_version
        assert metadata["dagster/row_count"].value == len(rows)
        assert metadata["path"].value == str(tmp_path / "table")
        assert [c.name for c in metadata["dagster/column_schema"].schema.columns] == ["path", "n", "at"]
    pd.testing.assert_frame_equal(load_asset(str(tmp_path), "table"), frame.iloc[:1], check_dtype=False)
    pd.testing.assert_frame_equal(load_asset(str(tmp_path), "table", version=0), frame, check_dtype=False)
    assert DeltaTable(str(tmp_path / "table"), version=0).to_pandas().shape == (2, 3)


def test_io_manager_round_trips_spark_dataframes(tmp_path, spark):
    from deltalake import DeltaTable
    from pyspark.sql import DataFrame as SparkDataFrame

    manager = io_manager(tmp_path)
    df = spark.createDataFrame([(i, [float(i)] * 3) for i in range(100)], "id long, v array<float>").repartition(4)
    manager.handle_output(_output("vectors"), df)
    assert len(DeltaTable(str(tmp_path / "vectors")).file_uris()) == 4  # one file per partition, written by the executors
    loaded = load_asset(str(tmp_path), "vectors", SparkDataFrame)
    assert sorted(row.id for row in loaded.collect()) == list(range(100))
    assert DeltaTable(str(tmp_path / "vectors")).to_pandas().shape == (100, 2)


def test_spark_files_roll_over_at_the_row_limit(tmp_path, spark):
    from fruit_assets.storage import spark_io

    location = storage.resolve(str(tmp_path / "t"))
    files, schema = spark_io.write_files(spark.range(2500).repartition(2), location, rows_per_file=1000)
    assert sorted(f.rows for f in files) == sorted([1000, 250] * 2)  # 1,250 rows per partition
    assert schema.names == ["id"]


def test_a_failed_write_keeps_the_last_good_version_and_leaves_no_files(tmp_path, spark):
    from pyspark.sql import functions as F
    from pyspark.sql.functions import udf

    manager = io_manager(tmp_path)
    good = pd.DataFrame({"id": range(10)})
    manager.handle_output(_output("asset"), good)
    before = sorted(os.listdir(tmp_path / "asset"))

    @udf("long")
    def explode_on_seven(value):
        if value == 7:
            raise RuntimeError("injected failure mid-write")
        return value

    failing = spark.range(20).repartition(4).select(explode_on_seven(F.col("id")).alias("id"))
    with pytest.raises(Exception, match="injected failure mid-write"):
        manager.handle_output(_output("asset"), failing)
    pd.testing.assert_frame_equal(load_asset(str(tmp_path), "asset"), good)
    assert sorted(os.listdir(tmp_path / "asset")) == before


def _straggler(location, prefix, rows=5):
    """A task of a parallel write (spark_io's per-partition writer), run here as a Spark Python worker runs it."""
    from fruit_assets.storage import spark_io

    schema = pa.schema([("id", pa.int64())])
    batch = pa.RecordBatch.from_pydict({"id": list(range(rows))}, schema=schema)
    return spark_io._file_writer(location.uri, schema, 1000, prefix)(iter([batch]))


def test_a_task_of_a_failed_write_writes_nothing_after_the_driver_gave_it_up(tmp_path):
    """Spark reports a failed job while other tasks' Python workers may still be writing: their files came
    after the driver's clean-up (BENCHMARKS.md, 2026-12-07 night). A task that starts after the driver
    closed the write writes nothing."""
    from fruit_assets.storage import delta, spark_io

    location = storage.resolve(str(tmp_path / "t"))
    delta.open_write(location, "part-abc")
    assert list(_straggler(location, "part-abc"))  # open: the task writes its file and reports it
    delta.close_write(location, "part-abc")
    with pytest.raises(spark_io.WriteAbandoned, match="no file written"):
        list(_straggler(location, "part-abc"))
    assert [n for n in os.listdir(tmp_path / "t") if n.endswith(".parquet")] and len(os.listdir(tmp_path / "t")) == 1


def test_a_task_whose_write_is_given_up_while_it_writes_removes_its_file(tmp_path, monkeypatch):
    from fruit_assets.storage import delta, spark_io

    location = storage.resolve(str(tmp_path / "t"))
    delta.open_write(location, "part-abc")
    write_file = delta.write_arrow_file

    def write_while_the_driver_gives_up(*args, **kwargs):
        written = write_file(*args, **kwargs)
        delta.close_write(location, "part-abc")  # the driver, after listing the folder without this file
        return written

    monkeypatch.setattr(delta, "write_arrow_file", write_while_the_driver_gives_up)
    with pytest.raises(spark_io.WriteAbandoned, match="its files are removed"):
        list(_straggler(location, "part-abc"))
    assert os.listdir(tmp_path / "t") == []


def test_discarding_a_failed_writes_files_goes_on_past_one_already_gone(tmp_path):
    from fruit_assets.storage import delta

    location = storage.resolve(str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    for name in ("part-abc-1.parquet", "part-abc-2.parquet", "part-abc-3.parquet", "part-other.parquet"):
        (tmp_path / "t" / name).write_bytes(b"x")
    filesystem, deleted = location.filesystem, []

    class RemovedMeanwhile:  # a task removed the first file itself (see the test above) just before
        def __getattr__(self, name):
            return getattr(filesystem, name)

        def delete_file(self, path):
            deleted.append(path)
            if len(deleted) == 1:
                raise FileNotFoundError(path)
            filesystem.delete_file(path)

    delta.discard_prefix(dataclasses.replace(location, filesystem=RemovedMeanwhile()), "part-abc")
    assert len(deleted) == 3 and len(os.listdir(tmp_path / "t")) == 2  # the one "gone", and the other write's


def test_io_manager_refuses_unknown_types_without_touching_data(tmp_path):
    manager = io_manager(tmp_path)
    manager.handle_output(_output("asset"), pd.DataFrame({"x": [1]}))
    with pytest.raises(TypeError, match="cannot store a dict"):
        manager.handle_output(_output("asset"), {"not": "a table"})
    assert len(load_asset(str(tmp_path), "asset")) == 1


def test_loading_an_asset_that_was_never_materialized_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="materialize it first"):
        context = input_context(asset_key=AssetKey("missing"), dagster_type=PythonObjectDagsterType(pd.DataFrame))
        io_manager(tmp_path).load_input(context)


@pytest.mark.parametrize("max_folder_listings", [1000, 0], ids=["folder by folder", "flat"])
def test_catalog_lists_images_with_their_folder_as_label(tmp_path, max_folder_listings):
    files = {
        "Apple Red/r0_0.jpg": b"x" * 3,
        "Apple Red/r0_1.JPEG": b"x" * 4,
        "Banana/sub/r0_2.png": b"x" * 5,  # the label is the folder that holds the file
        "Banana/notes.txt": b"not an image",
        "stray.jpg": b"outside any label folder",
        ".hidden/r0_3.jpg": b"hidden",
    }
    for relative, data in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    listing = list_images(storage.resolve(str(tmp_path)), max_folder_listings=max_folder_listings)
    assert listing.flat == (max_folder_listings == 0)
    catalog = listing.catalog()
    assert list(catalog.label) == ["Apple Red", "Apple Red", "sub"]
    assert list(catalog.size_bytes) == [3, 4, 5]
    assert catalog.path.iloc[0] == str(tmp_path / "Apple Red" / "r0_0.jpg")
    assert str(catalog.modified_at.dtype) == "datetime64[ns, UTC]"
    assert listing.ignored == 2
    assert listing.ignored_examples == (str(tmp_path / "Banana" / "notes.txt"), str(tmp_path / "stray.jpg"))


def test_catalog_of_a_missing_folder_is_empty(tmp_path):
    listing = list_images(storage.resolve(str(tmp_path / "nothing")))
    catalog = listing.catalog()
    assert catalog.empty and listing.ignored == 0 and listing.ignored_examples == ()
    assert list(catalog.columns) == ["path", "label", "size_bytes", "modified_at"]
    assert pa.Table.from_pandas(catalog).num_rows == 0


def test_each_versions_commit_info_is_its_own_where_delta_rs_history_is_not(tmp_path):
    """delta.commit_info reads the version's own log file. deltalake's `history()` of a table loaded at
    an earlier version gives the latest commits' infos under that version's numbers (1.6.6): when this
    test's second half fails, delta-rs was fixed and `log_commit_info` can use `history()`."""
    from deltalake import DeltaTable

    from fruit_assets.storage import delta

    location = storage.resolve(str(tmp_path / "table"))
    schema = pa.schema([("n", pa.int64())])
    base = None
    for n in range(4):
        written = delta.write_arrow_file(location, pa.table({"n": [n]}, schema=schema))
        delta.commit(location, [written], schema, base, metadata={"n": n})
        base = delta.snapshot(location)
    assert [delta.commit_info(location, version)["n"] for version in range(4)] == [0, 1, 2, 3]
    assert delta.snapshot(location, 1).commit["n"] == 1
    assert delta.is_table(location) and not delta.is_table(location.child("none"))

    custom = delta.COMMIT_KEY
    history = DeltaTable(str(tmp_path / "table"), version=0).history(1)
    assert (history[0]["version"], json.loads(history[0][custom])["n"]) == (0, 3)  # version 0, version 3's info


def test_reading_a_table_builds_no_python_filesystem(tmp_path, monkeypatch):
    """delta.read_arrow reads through our own filesystem: deltalake's default, a PyFileSystem, could be
    released on an Arrow thread while Python exits and abort the process after its work was done (the
    demo's "terminate called without an active exception"; see read_arrow)."""
    import pyarrow.fs as pafs

    from fruit_assets.storage import delta

    location = storage.resolve(str(tmp_path / "table"))
    schema = pa.schema([("n", pa.int64())])
    base = None
    for n in range(2):
        delta.commit(location, [delta.write_arrow_file(location, pa.table({"n": [n, n + 10]}, schema=schema))], schema, base)
        base = delta.snapshot(location)

    def refuse(*args, **kwargs):
        raise AssertionError("a PyFileSystem was built to read the table")

    monkeypatch.setattr(pafs, "PyFileSystem", refuse)
    assert sorted(delta.read_arrow(location).column("n").to_pylist()) == [0, 1, 10, 11]
    assert delta.read_arrow(location, 0, columns=["n"]).column("n").to_pylist() == [0, 10]
