"""The `fruit_assets` code location: assets, the job that materializes them, and the resources of the
deployment named by FRUIT_DEPLOYMENT (default `local`)."""

from fruit_assets.plumbing import quiet

# Before anything imports TensorFlow or starts Spark: `dagster dev` runs and `dagster asset materialize`
# (in-process) are quiet too. FRUIT_VERBOSE=1 keeps the libraries' own start-up messages.
quiet.configure_environment()

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor  # noqa: E402

from fruit_assets.assets import all_assets, all_assets_and_checks, all_checks  # noqa: E402, F401 - the tests import them here
from fruit_assets.resources import build_resources, deployment_name  # noqa: E402
from fruit_assets.sensors import fruit_images_sensor  # noqa: E402

fruit_features_job = define_asset_job(
    "fruit_features_job",
    selection=AssetSelection.assets(*all_assets),
    description="Catalog the images, featurize them with MobileNetV2, fit PCA, project.",
)


def assets_for(deployment: str) -> list:
    """The assets of a deployment: databricks_pipes has its own Spark assets (same keys and checks)."""
    if deployment == "databricks_pipes":
        from fruit_assets.databricks.pipes.assets import pipes_assets

        return pipes_assets
    return all_assets


defs = Definitions(
    assets=assets_for(deployment_name()),
    asset_checks=all_checks,
    jobs=[fruit_features_job],
    sensors=[fruit_images_sensor],
    resources=build_resources(),
    # Every step of a run in one process, in every deployment. Locally: one Spark session, one set of
    # warm Python workers (and the model they built) for all steps, where a process per step paid for
    # Spark's start-up and the model again at each step. On Databricks (step launcher or Pipes) the
    # graph is a chain, so a process per step (Dagster's default) ran nothing in parallel and paid a
    # fresh Python importing Dagster and this package at each step: the step launcher's graph CLI run
    # and its six other scenarios took 287 CPU-s with it and 220 in one process, the whole test suite
    # 1,241 and 1,009 (2-core Intel Xeon, AVX-512; BENCHMARKS.md). Ctrl-C still cancels the remote run.
    # The Dagster UI still shows each step and its logs.
    executor=in_process_executor,
)
