"""FRUIT_DEPLOYMENT=databricks_pipes: the Spark assets as Databricks job runs launched by Dagster Pipes,
staged in a Unity Catalog volume (no DBFS), on a classic cluster or on serverless compute.

host.py (the resource), assets.py (the assets), settings.py (the settings file) run on the host;
entry.py, remote.py and work.py in the Databricks task."""
