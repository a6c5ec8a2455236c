"""Databricks: the supported runtimes, the step launcher and what it needs from a workspace, and a
cluster step's preflight check."""
