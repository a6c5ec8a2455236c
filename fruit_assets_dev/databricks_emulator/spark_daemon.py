"""The emulated driver's Spark Python worker daemon: `fruit_assets.plumbing.spark_worker_daemon`, run by path.

An emulated runtime's pyspark is pip's, so it carries `pyspark.zip`, which Spark puts first on its workers'
path, and from which Python compiles pyspark again in every daemon (no bytecode is cached for a zip). The
local deployment names that module as its daemon (`spark.python.daemon.module`); the runner names this one,
because the task's environment cannot import `fruit_assets` (its PYTHONPATH holds only this package, and
the project's package comes from what the launcher ships). The file needs nothing but the standard
library, so it runs as it is, and only one copy of it exists.
"""

import os
import runpy

# fruit_assets_dev is a link in the task's path folder: resolved, it is the checkout's, beside fruit_assets.
CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
WORKER_DAEMON_FILE = os.path.join(CHECKOUT, "fruit_assets", "plumbing", "spark_worker_daemon.py")

if __name__ == "__main__":
    runpy.run_path(WORKER_DAEMON_FILE, run_name="__main__")
