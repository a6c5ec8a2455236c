"""The four assets, raw_images -> image_features -> pca_model -> reduced_features, and their checks.

Thin Dagster wiring: the work is done by plain functions (`pipeline`, `ml`), which
return results that small builders here turn into metadata and checks. The Spark assets take the
`step_launcher` resource so that a deployment can run them elsewhere (Databricks) by changing
resources only; locally it is None and they run in-process. Checks are computed in the same Spark
pass as the data they check, except the PCA's, which reads what pca_model stored.
"""

from fruit_assets.assets.catalog import raw_images
from fruit_assets.assets.features import image_features
from fruit_assets.assets.pca import pca_model, pca_model_is_an_exact_decomposition, reduced_features

all_assets = [raw_images, image_features, pca_model, reduced_features]
all_checks = [pca_model_is_an_exact_decomposition]
# What `materialize()` takes to run the whole graph with its checks (the demo, the tests).
all_assets_and_checks = [*all_assets, *all_checks]
