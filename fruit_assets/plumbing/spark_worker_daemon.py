"""Spark's Python worker daemon (`pyspark.daemon`), importing pyspark from its installed package.

Spark puts `$SPARK_HOME/python/lib/pyspark.zip` and py4j's zip first on its Python workers' path. With
pyspark installed by pip, both zips sit inside the installed package and hold the sources of the same
release, but Python cannot cache bytecode for modules it imports from a zip: every daemon and every
worker it forks compiled pyspark's modules from source. Measured on 2 cores (AMD EPYC, Zen 4): importing
`pyspark.daemon` and `pyspark.worker` took 0.63-0.66 CPU-seconds from the zip and 0.13 from the package; a
session that runs a pandas UDF on 2 workers, 2.0-2.2 CPU-s of UDF worker processes against 1.1-1.4 (measured
with a first version that only moved the zips to the end of the path).

Spark runs the module named by `spark.python.daemon.module` (a documented setting, SPARK-22959) as the
daemon, with the worker module as its argument. This one takes those zips off `sys.path`, so that the
installed packages are found, and runs `pyspark.daemon` as Spark would. It also forgets their zip
importers, which Python made while looking for this module: a worker calls `importlib.invalidate_caches()`
before every task, and that read pyspark.zip's directory again each time (8 ms). Should pyspark or py4j
not be importable without its zip, the zip goes back, behind the other entries. Zips that are not inside
an installed package (a Spark distribution's `python/lib`) keep their place.
"""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys

DAEMON_SETTING = "spark.python.daemon.module"


def bundled_zip(entry: str) -> bool:
    """Whether a `sys.path` entry is a zip that an installed pyspark carries (`<package>/python/lib/*.zip`)."""
    library = os.path.dirname(entry)
    package = os.path.dirname(os.path.dirname(library))
    return (entry.endswith(".zip") and os.path.basename(library) == "lib"
            and os.path.basename(os.path.dirname(library)) == "python"
            and os.path.isfile(os.path.join(package, "__init__.py")))


def without_bundled_zips() -> None:
    """Take the zips of an installed pyspark off `sys.path` (see above); back at its end if still needed."""
    bundled = [entry for entry in sys.path if bundled_zip(entry)]
    sys.path[:] = [entry for entry in sys.path if not bundled_zip(entry)]
    for entry in bundled:
        sys.path_importer_cache.pop(entry, None)
    if any(importlib.util.find_spec(name) is None for name in ("pyspark", "py4j")):
        sys.path.extend(bundled)


if __name__ == "__main__":
    without_bundled_zips()
    runpy.run_module("pyspark.daemon", run_name="__main__", alter_sys=True)
