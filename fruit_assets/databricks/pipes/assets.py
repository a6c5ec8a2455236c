"""The Spark assets of FRUIT_DEPLOYMENT=databricks_pipes: the same keys, dependencies and checks as
assets/, each materialized by one Databricks job run (host.DatabricksPipes). Pipes carries no IO
manager: the task reads its inputs from storage and commits its own Delta table, and these assets
return what it reported (MaterializeResult, AssetCheckResults). raw_images runs on the host as always.
"""

from dagster import AssetExecutionContext, AssetKey, asset

from fruit_assets.assets import all_checks, raw_images
from fruit_assets.assets.features import CHECKS as FEATURE_CHECKS
from fruit_assets.assets.pca import GROUP, PcaConfig
from fruit_assets.assets.pca import pca_model as local_pca_model
from fruit_assets.assets.pca import reduced_features as local_reduced_features
from fruit_assets.databricks.pipes.host import DatabricksPipes
from fruit_assets.resources import FeatureModel
from fruit_assets.storage.resource import Storage

KINDS = {"databricks", "spark", "delta"}


@asset(group_name=GROUP, kinds=KINDS, check_specs=FEATURE_CHECKS, deps=[AssetKey("raw_images")])
def image_features(context: AssetExecutionContext, databricks_pipes: DatabricksPipes, storage: Storage,
                   feature_model: FeatureModel):
    """MobileNetV2 features of every image (see assets/features.py), computed by a Databricks job run."""
    yield from databricks_pipes.materialize(context, storage, feature_model=feature_model)


@asset(group_name=GROUP, kinds=KINDS, check_specs=list(local_pca_model.check_specs), deps=[AssetKey("image_features")])
def pca_model(context: AssetExecutionContext, config: PcaConfig, databricks_pipes: DatabricksPipes, storage: Storage):
    """PCA of the features (see assets/pca.py), computed by a Databricks job run."""
    yield from databricks_pipes.materialize(context, storage, pca_config=config.model_dump())


@asset(group_name=GROUP, kinds=KINDS, check_specs=list(local_reduced_features.check_specs),
       deps=[AssetKey("image_features"), AssetKey("pca_model")])
def reduced_features(context: AssetExecutionContext, databricks_pipes: DatabricksPipes, storage: Storage):
    """The features projected on the PCA components (see assets/pca.py), computed by a Databricks job run."""
    yield from databricks_pipes.materialize(context, storage)


pipes_assets = [raw_images, image_features, pca_model, reduced_features]
pipes_checks = all_checks  # pca_model_is_an_exact_decomposition runs on the host, reading storage
