"""Loaded by the Python processes whose PYTHONPATH starts with this folder: the Spark Python workers of
`test_runtimes.py` only (set through SparkContext.environment, never for the test process itself).

It makes any import of TensorFlow or Keras in those processes fail, and writes the attempt (module
name, pid, the importing stack) to the file named by FRUIT_TEST_IMPORT_LOG, so that an attempt that
some code catches and swallows is seen too.
"""

import importlib.abc
import os
import sys
import traceback

BLOCKED = ("tensorflow", "keras", "tf_keras", "tf2onnx")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in BLOCKED:
            return None
        log = os.environ.get("FRUIT_TEST_IMPORT_LOG")
        if log:
            with open(log, "a") as out:
                out.write(f"pid {os.getpid()} imported {fullname}\n{''.join(traceback.format_stack(limit=12))}\n")
        raise ImportError(f"{fullname} is blocked in this Spark Python worker (fruit_assets_tests/worker_guard)")


sys.meta_path.insert(0, _Blocker())
