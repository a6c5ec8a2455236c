"""Spark's Python workers import pyspark from its installed package, where Python keeps its bytecode, not
from the pyspark.zip that Spark puts first on their path (`plumbing.spark_worker_daemon`)."""

import zipfile

from fruit_assets.plumbing.spark_worker_daemon import bundled_zips_last


def test_the_zips_an_installed_pyspark_carries_go_last_and_no_other_entry_moves(tmp_path):
    site = tmp_path / "site-packages"
    (site / "pyspark" / "python" / "lib").mkdir(parents=True)
    (site / "pyspark" / "__init__.py").write_text("")
    bundled = [str(site / "pyspark" / "python" / "lib" / name) for name in ("pyspark.zip", "py4j-0.10.9.9-src.zip")]
    distribution = tmp_path / "spark"  # a Spark distribution's python/lib (no package around it), as on a cluster
    (distribution / "python" / "lib").mkdir(parents=True)
    foreign = [str(distribution / "python" / "lib" / "pyspark.zip"), str(tmp_path / "user.zip")]
    for name in (*bundled, *foreign):
        zipfile.ZipFile(name, "w").close()
    path = [bundled[0], bundled[1], str(tmp_path / "work"), foreign[0], "/usr/lib/python311.zip", foreign[1], str(site)]
    assert bundled_zips_last(path) == [str(tmp_path / "work"), foreign[0], "/usr/lib/python311.zip", foreign[1], str(site), *bundled]
    assert bundled_zips_last([str(site), "/elsewhere"]) == [str(site), "/elsewhere"]


def test_the_sessions_python_workers_import_pyspark_from_the_package_not_the_zip(spark):
    def origins(batches):
        import sys

        import py4j
        import pyspark
        import pyspark.worker

        on_path = [entry for entry in sys.path if entry.endswith("pyspark.zip")]
        for batch in batches:
            yield batch.assign(origin=f"{pyspark.__file__}|{pyspark.worker.__file__}|{py4j.__file__}|{on_path}")

    rows = spark.range(2, numPartitions=2).mapInPandas(origins, "id long, origin string").toPandas()
    for origin in rows.origin:
        package, worker, py4j, on_path = origin.split("|")
        # Spark did put its zip on the workers' path (else this would show nothing) ...
        assert "pyspark.zip" in on_path, origin
        # ... and the modules came from the installed packages all the same.
        assert package.endswith("site-packages/pyspark/__init__.py") and worker.endswith("site-packages/pyspark/worker.py"), origin
        assert ".zip" not in py4j, origin
