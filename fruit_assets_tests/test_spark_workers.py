"""Spark's Python workers import pyspark from its installed package, where Python keeps its bytecode, not
from the pyspark.zip that Spark puts first on their path (`plumbing.spark_worker_daemon`)."""

import sys
import zipfile

from fruit_assets.plumbing import spark_worker_daemon
from fruit_assets.plumbing.spark_worker_daemon import bundled_zip, without_bundled_zips


def _layout(tmp_path):
    """(an installed pyspark's zips, zips of other kinds) on disk."""
    site = tmp_path / "site-packages"
    (site / "pyspark" / "python" / "lib").mkdir(parents=True)
    (site / "pyspark" / "__init__.py").write_text("")
    bundled = [str(site / "pyspark" / "python" / "lib" / name) for name in ("pyspark.zip", "py4j-0.10.9.9-src.zip")]
    distribution = tmp_path / "spark"  # a Spark distribution's python/lib (no package around it), as on a cluster
    (distribution / "python" / "lib").mkdir(parents=True)
    foreign = [str(distribution / "python" / "lib" / "pyspark.zip"), str(tmp_path / "user.zip")]
    for name in (*bundled, *foreign):
        zipfile.ZipFile(name, "w").close()
    return bundled, foreign


def test_only_the_zips_an_installed_pyspark_carries_leave_the_path(tmp_path, monkeypatch):
    bundled, foreign = _layout(tmp_path)
    assert [bundled_zip(entry) for entry in (*bundled, *foreign, "/usr/lib/python311.zip", str(tmp_path))] == [
        True, True, False, False, False, False]
    rest = [str(tmp_path / "work"), foreign[0], "/usr/lib/python311.zip", foreign[1]]
    monkeypatch.setattr(sys, "path", [*bundled, *rest])
    monkeypatch.setattr(sys, "path_importer_cache", {entry: object() for entry in (*bundled, foreign[0])})
    monkeypatch.setattr(spark_worker_daemon.importlib.util, "find_spec", lambda name: object())  # both installed
    without_bundled_zips()
    assert sys.path == rest and set(sys.path_importer_cache) == {foreign[0]}


def test_a_package_that_needs_its_zip_gets_it_back_at_the_end(tmp_path, monkeypatch):
    bundled, foreign = _layout(tmp_path)
    monkeypatch.setattr(sys, "path", [bundled[0], foreign[1], bundled[1]])
    monkeypatch.setattr(spark_worker_daemon.importlib.util, "find_spec", lambda name: None if name == "py4j" else object())
    without_bundled_zips()
    assert sys.path == [foreign[1], *bundled]


def test_the_sessions_python_workers_import_pyspark_from_the_package_not_the_zip(spark):
    def origins(batches):
        import os
        import sys

        import py4j
        import pyspark
        import pyspark.worker

        given = os.environ.get("PYTHONPATH", "")
        zips = [entry for entry in [*sys.path, *sys.path_importer_cache] if entry.endswith(".zip") and "pyspark" in entry]
        for batch in batches:
            yield batch.assign(origin=f"{pyspark.__file__}|{pyspark.worker.__file__}|{py4j.__file__}|{given}|{zips}")

    rows = spark.range(2, numPartitions=2).mapInPandas(origins, "id long, origin string").toPandas()
    for origin in rows.origin:
        package, worker, py4j, given, zips = origin.split("|")
        # Spark did give its workers the zip (else this would show nothing) ...
        assert "pyspark.zip" in given, origin
        # ... and the modules came from the installed packages all the same, with no zip importer left.
        assert package.endswith("site-packages/pyspark/__init__.py") and worker.endswith("site-packages/pyspark/worker.py"), origin
        assert ".zip" not in py4j and zips == "[]", origin
