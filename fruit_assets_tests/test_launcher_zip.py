"""What the Databricks step launcher ships to the cluster with every step: the pipeline, nothing else."""

import zipfile
from pathlib import Path

from dagster_pyspark.utils import build_pyspark_zip

from fruit_assets.resources import staged_package

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("fruit_assets_dev", "local_s3", "databricks_emulator", "demo", "benchmarks", "fruit_assets_tests", ".venv")


def test_the_launcher_zip_holds_only_the_pipeline(tmp_path):
    archive = tmp_path / "code.zip"
    build_pyspark_zip(str(archive), staged_package())  # exactly what the launcher does with it
    names = zipfile.ZipFile(archive).namelist()
    assert names and all(name.startswith("fruit_assets/") and name.endswith(".py") for name in names)
    assert not [name for name in names if any(tool in name for tool in TOOLS)]
    for module in ("definitions.py", "assets/features.py", "resources/io_manager.py", "storage/delta.py", "ml/onnx_model.py", "ml/pca.py"):
        assert f"fruit_assets/{module}" in names
    # Exactly the pipeline: every module of the package in the checkout (the demo is in fruit_assets_dev), no more, no less
    # (a line budget stood here; it broke when the pipeline grew, and passed a zip that lacked a module).
    package = REPO / "fruit_assets"
    expected = {
        f"fruit_assets/{path.relative_to(package).as_posix()}"
        for path in package.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert set(names) == expected
