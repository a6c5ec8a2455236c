"""A local Databricks workspace emulator, to run the real Databricks step launcher without a workspace.

It serves the part of the Databricks REST API that databricks-sdk and
``dagster_databricks.databricks_pyspark_step_launcher`` use, on 127.0.0.1, with bearer-token auth. DBFS is
a local folder, and each submitted ``spark_python_task`` runs as a local process on local Spark. Nothing
is installed and nothing leaves the machine.

Python API::

    from fruit_assets_dev.databricks_emulator import DatabricksEmulator

    with DatabricksEmulator(root="/tmp/dbx", secrets={"storage": {"access_key": "...", "secret_key": "..."}}) as emu:
        emu.url, emu.token             # host and personal access token for databricks-sdk / the step launcher
        emu.workspace_client()         # a databricks.sdk.WorkspaceClient for it
        emu.runs, emu.get_run(run_id)  # the submitted runs (state, pid, log files, "would install" libraries)
        emu.wait_for_run(run_id, timeout=300)
        emu.request_log                # (time, method, path, status) of every request: no headers, bodies or tokens
        emu.requests_to(r"/jobs/runs/submit")
        emu.local_path("dbfs:/x")      # the local file behind a DBFS path (or a /dbfs/x driver path)

``start()`` / ``stop()`` work too; ``stop()`` cancels the runs still going. Command line (for dry runs by
hand)::

    python -m fruit_assets_dev.databricks_emulator --root ./data/databricks --port 8765 \\
        --token-env MY_TOKEN --secret storage/access_key=AWS_ACCESS_KEY_ID --secret storage/secret_key=AWS_SECRET_ACCESS_KEY

Endpoints (anything else answers 404 ``ENDPOINT_NOT_FOUND`` naming the method and path):

* DBFS ``/api/2.0/dbfs/``: ``create``, ``add-block``, ``close`` (streaming upload, 1 MB blocks), ``put``,
  ``read`` (at most 1 MB at a time), ``get-status``, ``list``, ``mkdirs``, ``delete``, ``move``.
* Jobs ``/api/2.{0,1,2}/jobs/runs/``: ``submit`` (one ``spark_python_task`` on ``new_cluster`` or
  ``existing_cluster_id``; 2.0's single-task form too; ``idempotency_token``, ``timeout_seconds``), ``get``
  (by run id or task run id), ``get-output`` (task run id only, as on Databricks), ``cancel``, ``list``.
* Files API ``/api/2.0/fs/files/Volumes/...`` (PUT raw bytes, GET, HEAD, DELETE) and
  ``/api/2.0/fs/directories/Volumes/...`` (PUT, GET: list, HEAD, DELETE): Unity Catalog volumes in
  ``<root>/volumes``, which each task sees at ``/Volumes`` (``volumes.py``: a private mount namespace; root only).
  A ``spark_python_task.python_file`` may be a ``/Volumes/...`` file.
* Serverless tasks (``environment_key`` and the run's ``environments``, version 4): run on the 17.3 LTS
  packages with pyspark's connect extra, as a Spark Connect client only (``serverless.py``).
* ``/api/2.{0,1}/clusters/get``, ``clusters/list``: the runs' job clusters and the existing clusters.
* ``/api/2.0/libraries/``: ``cluster-status``, ``all-cluster-statuses``, ``install``, ``uninstall`` (recorded,
  never installed).
* ``/api/2.0/permissions/{type}/{id}``: GET, PUT, PATCH (recorded: ``emu.permissions(type, id)``).
* ``/api/2.0/secrets/scopes/list``, ``/api/2.0/secrets/list`` (names only). ``/api/2.0/secrets/get`` is
  refused: secret values go to tasks only, through ``dbutils.secrets``.
* ``/api/2.0/preview/scim/v2/Me`` (the current user), and, for people: ``/`` (the runs) and
  ``/emulator/runs/<run_id>`` (one run with its log tails), which is where ``run_page_url`` points. The
  token is required there too (``curl -H "Authorization: Bearer $DATABRICKS_TOKEN" ...``).

``DatabricksEmulator(..., dbfs_root=False)`` (``--no-dbfs-root``) is a workspace without DBFS root, as
new accounts are provisioned: every DBFS API call answers 403 ``PERMISSION_DENIED`` "Public DBFS root is
disabled. Access is denied on path: ...".

A missing token answers 401 ``UNAUTHENTICATED``, a wrong one 403 ``PERMISSION_DENIED``; databricks-sdk
raises ``Unauthenticated`` / ``PermissionDenied``.

Runtimes (``environments.py``). A ``new_cluster`` must name a supported ``spark_version`` (the table of
``fruit_assets/databricks/runtimes.py``: 17.3 LTS, 18 LTS); any other is refused at submit with 400
``INVALID_PARAMETER_VALUE`` and the list, as the API refuses a runtime it does not know. An existing
cluster runs the ``spark_version`` of its spec in ``clusters``. With ``environments=DIR`` (the command
line's default: ``<root>/environments``), each task runs in that runtime's Python 3.12 with its packages
pinned (pyspark, numpy, pandas, pyarrow, pillow, deltalake on 18 LTS, protobuf, grpcio, requests, pyyaml,
boto3, databricks-sdk), the run's ``pypi`` libraries pip-installed (uv) over them: an environment per
runtime and libraries, built once while the run is PENDING ("Installing libraries"); a library that
fails to install ends the run INTERNAL_ERROR / FAILED with the installer's message. Without it (local
mode), tasks run the emulator's Python and its packages, and libraries are only logged "would install".

How a task runs (``runner.py``): in a new process group, with the runtime environment's Python (local mode:
this interpreter), the emulator's environment plus ``env`` plus the cluster's ``spark_env_vars``
(``PYSPARK_PYTHON`` is always the task's Python; on an emulated runtime ``PYTHONPATH`` holds only
``fruit_assets_dev``, for the runner, and ``SPARK_HOME`` is dropped, so Spark is the runtime's pyspark;
``SPARK_LOCAL_IP=127.0.0.1``; ``DATABRICKS_EMULATOR_URL`` is set; ``DATABRICKS_RUNTIME_VERSION`` is the
runtime's major.minor, as Databricks sets it). The runner first writes ``<root>/runs/<run_id>/runtime.json``
(the versions of python, pyspark, numpy, pandas, pyarrow, deltalake and onnxruntime that it sees), then starts
a local SparkSession (``spark_master``, default ``local[2]``, UI off; the cluster's ``spark_conf`` except
``spark.master``; Python workers through ``spark_daemon.py``, which imports pyspark from the environment's
package rather than its ``pyspark.zip``, unless the ``spark_conf`` names a daemon), and gives the script the
Databricks globals ``spark``, ``sc`` and ``dbutils`` (``secrets`` and ``fs``). The run is PENDING until Spark
is up, then RUNNING, then TERMINATED with SUCCESS (exit 0), FAILED (the traceback tail in ``state_message``,
``error``/``error_trace`` in get-output), CANCELED (runs/cancel: the process group gets SIGTERM, then SIGKILL)
or TIMEDOUT; a task that dies before Spark is up ends INTERNAL_ERROR / FAILED. (SKIPPED, Databricks' "a
previous run of the same job was active", cannot happen to one-time runs.) stdout and stderr go to
``<root>/runs/<run_id>/``; ``get-output`` serves stdout (``logs``, last 5 MB) with secret values replaced by
``[REDACTED]``. A cluster with ``cluster_log_conf.dbfs`` gets its driver logs at
``<destination>/<cluster_id>/driver/{stdout,stderr}`` when the run ends.

DBFS paths: ``dbfs:/x`` and ``/x`` (REST API, dbutils.fs) are ``<root>/dbfs/x``. A task sees DBFS as
Databricks drivers do through their ``/dbfs`` FUSE mount, but there is no mount here (it would need root
and be shared by every emulator on the machine). Instead the emulator rewrites the task's arguments: the
``python_file`` (``dbfs:/...``, the only kind accepted) is run from ``<root>/dbfs/...``, a parameter
``/dbfs/x`` becomes the local path ``<root>/dbfs/x``, and a parameter ``dbfs:/x`` becomes
``file://<root>/dbfs/x`` (still a URI, so Spark and dbutils.fs read it and a plain ``open()`` fails, as
on Databricks). Other parameters are passed as they are. Nothing is patched: paths a task derives from its arguments (as
``databricks_step_main`` does for its events, stdout and stderr files, next to the step-run-ref it was
given) are local paths inside the DBFS folder, which the REST API serves. A ``/dbfs/...`` path written
into code or into a pickled object, not passed as a parameter, is not translated.
"""

__all__ = ["DatabricksEmulator", "EmulatedRun", "RequestRecord"]


def __getattr__(name: str):
    # The server on first use, not on the package's import: the processes of an emulated task (runner.py,
    # spark_daemon.py, every Spark Python worker daemon) import this package, and the server's imports
    # (http.server, logging...) took 65 ms of each start.
    if name in __all__:
        from fruit_assets_dev.databricks_emulator import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
