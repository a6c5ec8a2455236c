"""What `databricks_pyspark_step_launcher` needs from a workspace, checked before a step is launched.

The launcher stages every step's files through the DBFS API (`/api/2.0/dbfs/create`, `add-block`,
`close`) under `dbfs:/<staging_prefix>/` and hands `/dbfs/...` paths to the task. Databricks now
provisions new accounts without a DBFS root, and workspaces may turn it off
(https://docs.databricks.com/aws/dbfs/disable-dbfs-root-mounts, workspace setting `disable_legacy_dbfs`;
account setting `disable_legacy_features` for new workspaces). There the DBFS API answers
403 PERMISSION_DENIED "Public DBFS root is disabled. Access is denied on path: ..." (the message as
users report it, e.g. github.com/microsoft/unified-data-foundation-with-fabric-solution-accelerator
pull 57, which matches "PERMISSION_DENIED" and "DBFS root is disabled"; notebooks see the same text
as `[DBFS_DISABLED] Public DBFS root is disabled. Access is denied on path: ...`). The launcher would
fail on its first upload with that bare refusal; `require_dbfs_root` says what it means instead.

Dagster-free; the caller passes the databricks-sdk `dbfs` API.
"""

from __future__ import annotations

import re

# Matched on the message, not only the code: a wrong token is PERMISSION_DENIED too.
_DBFS_ROOT_DISABLED = re.compile(r"DBFS root is disabled|DBFS_DISABLED", re.IGNORECASE)


class NoDbfsRootError(RuntimeError):
    """The workspace refuses the DBFS root, where the step launcher must stage its files."""


def is_dbfs_root_refusal(error: BaseException) -> bool:
    return bool(_DBFS_ROOT_DISABLED.search(str(error)))


def no_dbfs_root_message(host: str, staging_prefix: str, answer: str) -> str:
    return (
        f"The Databricks workspace {host} has no DBFS root (the DBFS API answered: {answer.strip()}). "
        f"databricks_pyspark_step_launcher stages each step's code and state under dbfs:{staging_prefix} "
        "and cannot run there. Use FRUIT_DEPLOYMENT=databricks_pipes instead, which stages everything in a "
        "Unity Catalog volume (FRUIT_DATABRICKS_PIPES_CONFIG: databricks_pipes.yaml for a classic cluster, "
        "databricks_pipes_serverless.yaml for serverless; README, 'Run on Databricks'), or a workspace with "
        "legacy DBFS enabled (a workspace admin turns off 'Disable legacy DBFS', setting disable_legacy_dbfs: "
        "https://docs.databricks.com/aws/dbfs/disable-dbfs-root-mounts)."
    )


def _answer(error: BaseException) -> str:
    # databricks-sdk appends its client configuration (" Config: host=..., token=***") to the message.
    return re.split(r"\s+Config: ", str(error), maxsplit=1)[0]


def require_dbfs_root(dbfs, host: str, staging_prefix: str) -> None:
    """One DBFS API call on the staging prefix (`get-status`): NoDbfsRootError if the workspace refuses
    the DBFS root. Any other answer (the prefix exists or not, another error) is left to the launcher,
    which reports it as it always has."""
    try:
        dbfs.get_status(staging_prefix)
    except Exception as error:  # databricks.sdk.errors.DatabricksError and subclasses
        if is_dbfs_root_refusal(error):
            raise NoDbfsRootError(no_dbfs_root_message(host, staging_prefix, _answer(error))) from None
