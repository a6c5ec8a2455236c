"""The step launcher of FRUIT_DEPLOYMENT=databricks: dagster-databricks' own, which first stages on the
host what the cluster step must not make itself.

`databricks_pyspark_step_launcher` runs on the host: `launch_step` uploads the step's code and state to
DBFS and submits it, and the asset body then runs on the cluster. So the code before the upload is the
host's. For a step that uses the `feature_model` resource with runtime onnxruntime (`image_features`),
the host resolves the weights and converts the Keras model to ONNX (its on-disk cache makes that once
per weights), writes the model and its record under `<FRUIT_STORAGE_URI>/_models/` (ml/staged_model.py),
and adds the file's URI and the weights fingerprint to the step's environment variables (the launcher's
`config.pkl`, which sets them before the step runs). The cluster then needs ONNX Runtime only: no
TensorFlow, tf2onnx or onnx. Other steps, and runtime tensorflow, are launched as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from dagster_databricks.databricks_pyspark_step_launcher import DatabricksConfig, DatabricksPySparkStepLauncher

FEATURE_MODEL = "feature_model"  # the resource whose model is staged (resources.FeatureModel)


def stage_feature_model(step_context: Any) -> dict[str, str]:
    """Host side, before a step is launched: the step's environment variables that name the staged
    model (none when the step does not featurize, or runs the tensorflow runtime)."""
    if FEATURE_MODEL not in step_context.required_resource_keys:
        return {}
    feature_model, storage = step_context.resources.feature_model, step_context.resources.storage
    settings = feature_model.featurize_settings()
    if settings.runtime != "onnxruntime":
        return {}  # the cluster rebuilds the Keras model itself: it needs TensorFlow anyway
    from fruit_assets.ml.featurize import prepare_feature_extractor
    from fruit_assets.ml.staged_model import stage

    model = prepare_feature_extractor(feature_model.weights_source(), settings)
    staged = stage(model, storage.root())
    step_context.log.info(
        f"ONNX model of {model.metadata['weights_source']} (weights fingerprint {model.fingerprint}) "
        f"{'staged at' if staged.uploaded else 'already staged at'} {staged.uri} for the cluster"
    )
    return staged.environment()


class StagingStepLauncher(DatabricksPySparkStepLauncher):
    """`DatabricksPySparkStepLauncher` that stages the feature model on the host before each launch."""

    def __init__(self, **config: Any):
        super().__init__(**config)
        self.staged_environment: dict[str, str] = {}

    def launch_step(self, step_context) -> Iterator:  # type: ignore[override]
        self.staged_environment = stage_feature_model(step_context)
        yield from super().launch_step(step_context)

    def create_remote_config(self) -> DatabricksConfig:
        remote = super().create_remote_config()
        remote.env_variables = {**remote.env_variables, **self.staged_environment}
        return remote
