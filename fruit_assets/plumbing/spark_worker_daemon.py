"""Spark's Python worker daemon (`pyspark.daemon`), importing pyspark from its installed package.

Spark puts `$SPARK_HOME/python/lib/pyspark.zip` and py4j's zip first on its Python workers' path. With
pyspark installed by pip, both zips sit inside the installed package and hold the sources of the same
release, but Python cannot cache bytecode for modules it imports from a zip: every daemon and every
worker it forks compiled pyspark's modules from source. Measured on 2 cores (AMD EPYC, Zen 4): importing
`pyspark.daemon` and `pyspark.worker` took 0.63-0.66 CPU-seconds from the zip and 0.13 from the package; a
session that runs a pandas UDF on 2 workers, 2.0-2.2 CPU-s of UDF worker processes against 1.1-1.4.

Spark runs the module named by `spark.python.daemon.module` (a documented setting, SPARK-22959) as the
daemon, with the worker module as its argument. This one moves those zips behind the other entries of
`sys.path`, where the installed package is found first, and runs `pyspark.daemon` as Spark would. Zips
that are not inside an installed package (a Spark distribution's `python/lib`) keep their place.
"""

from __future__ import annotations

import os
import runpy
import sys

DAEMON_SETTING = "spark.python.daemon.module"


def bundled_zips_last(path: list[str]) -> list[str]:
    """`path` with the zips that an installed pyspark carries (`<package>/python/lib/*.zip`) at its end."""

    def bundled(entry: str) -> bool:
        library = os.path.dirname(entry)
        package = os.path.dirname(os.path.dirname(library))
        return (entry.endswith(".zip") and os.path.basename(library) == "lib"
                and os.path.basename(os.path.dirname(library)) == "python"
                and os.path.isfile(os.path.join(package, "__init__.py")))

    return [entry for entry in path if not bundled(entry)] + [entry for entry in path if bundled(entry)]


if __name__ == "__main__":
    sys.path[:] = bundled_zips_last(sys.path)
    runpy.run_module("pyspark.daemon", run_name="__main__", alter_sys=True)
