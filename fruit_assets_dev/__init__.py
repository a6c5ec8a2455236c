"""Development tools of fruit_assets, not part of the pipeline: a local S3 (SeaweedFS on loopback)
and a local Databricks workspace emulator. They serve the tests and local dry runs; the package
`fruit_assets` never imports them, and the step launcher never ships them to a cluster.

Run from the repository root: `python -m fruit_assets_dev.local_s3 serve`,
`python -m fruit_assets_dev.databricks_emulator ...`."""
