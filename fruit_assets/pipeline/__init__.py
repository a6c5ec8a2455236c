"""The pipeline's work behind the assets, as plain functions: listing the images, the incremental
work of the three Spark assets, the images' state for the sensor, the plots. No Dagster here."""
