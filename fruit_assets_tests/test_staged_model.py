"""The ONNX model the host stages for a Databricks cluster (ml/staged_model.py): staged once, read back
checked against the host's fingerprint, and a clear error otherwise. Local folders stand in for S3 (the
same pyarrow calls); the end-to-end path through S3 and the emulator is test_databricks_pipeline.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fruit_assets.ml.featurize import PreparedModel
from fruit_assets.ml.staged_model import (
    MODELS_DIR,
    STAGED_FINGERPRINT_VARIABLE,
    STAGED_MODEL_VARIABLE,
    StagedModelError,
    load_staged,
    load_staged_from_environment,
    stage,
)
from fruit_assets.storage import resolve
from fruit_assets_tests.support import GUARDED_MODULES, write_import_guard

REPO = Path(__file__).resolve().parents[1]
FINGERPRINT = "0123456789abcdef"
def tiny_onnx_model() -> bytes:
    """(n, 224, 224, 3) float32 -> (n, 3): the mean of each channel. A real ONNX model, made without TensorFlow."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["features"], axes=[1, 2], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 224, 224, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def prepared(data: bytes, fingerprint: str = FINGERPRINT) -> PreparedModel:
    metadata = {"weights_source": "random:7", "weights_meaningful": False, "runtime": "onnxruntime",
                "onnx_model_file": f"/home/someone/.cache/fruit_assets/models/mobilenet_v2_features_{fingerprint}_abcd1234.onnx",
                "onnx_opset": 17, "onnx_converter": "tf2onnx 1.17.0", "onnx_conversion_max_abs_diff_vs_keras": 2e-5}
    return PreparedModel(data, fingerprint, metadata, 1.5, False)


def test_the_host_stages_the_model_once_and_the_cluster_reads_it_back_checked(tmp_path):
    root = resolve(str(tmp_path / "assets"))
    data = b"onnx bytes " * 100
    staged = stage(prepared(data), root)
    assert staged.uploaded
    assert staged.uri == str(tmp_path / "assets" / MODELS_DIR / f"mobilenet_v2_features_{FINGERPRINT}_abcd1234.onnx")
    record = json.loads(Path(staged.uri).with_suffix(".json").read_text())
    assert record["fingerprint"] == FINGERPRINT and record["bytes"] == len(data)
    assert record["metadata"]["weights_source"] == "random:7" and "onnx_model_file" not in record["metadata"]

    again = stage(prepared(data), root)  # a later run with the same weights writes nothing
    assert not again.uploaded and again.uri == staged.uri

    model = load_staged_from_environment(staged.environment())
    assert (model.payload, model.fingerprint, model.meaningful) == (data, FINGERPRINT, False)
    assert model.metadata["weights_source"] == "random:7"
    assert model.metadata["onnx_model_file"] == staged.uri and model.metadata["onnx_model_prepared_on"] == "host"
    assert model.metadata["host_model_setup_seconds"] == 1.5


def test_a_missing_staged_model_is_an_error_naming_the_path_and_the_fingerprint(tmp_path):
    uri = str(tmp_path / "assets" / MODELS_DIR / f"mobilenet_v2_features_{FINGERPRINT}_abcd1234.onnx")
    with pytest.raises(StagedModelError) as failed:
        load_staged(uri, FINGERPRINT)
    text = str(failed.value)
    assert uri.removesuffix(".onnx") + ".json" in text and FINGERPRINT in text
    assert "never converts" in text

    with pytest.raises(StagedModelError, match=f"{STAGED_MODEL_VARIABLE} and {STAGED_FINGERPRINT_VARIABLE} are not set"):
        load_staged_from_environment({})


def test_a_staged_model_of_other_weights_is_refused_naming_both_fingerprints(tmp_path):
    root = resolve(str(tmp_path / "assets"))
    staged = stage(prepared(b"model of other weights", "ffffeeeeddddcccc"), root)
    with pytest.raises(StagedModelError) as failed:
        load_staged(staged.uri, FINGERPRINT)  # the fingerprint the host computed for this run
    text = str(failed.value)
    assert staged.uri in text and "'ffffeeeeddddcccc'" in text and f"'{FINGERPRINT}'" in text


def test_an_altered_staged_model_is_refused_and_the_host_stages_it_anew(tmp_path):
    root = resolve(str(tmp_path / "assets"))
    data = b"the converted model"
    staged = stage(prepared(data), root)
    Path(staged.uri).write_bytes(b"the converted mode")  # cut short, or replaced by another writer
    with pytest.raises(StagedModelError) as failed:
        load_staged(staged.uri, FINGERPRINT)
    assert staged.uri in str(failed.value) and "altered or is incomplete" in str(failed.value)

    assert stage(prepared(data), root).uploaded is False  # the record still matches: the host...
    Path(staged.uri).with_suffix(".json").unlink()  # ...rewrites what a missing record leaves in doubt
    assert stage(prepared(data), root).uploaded
    assert load_staged(staged.uri, FINGERPRINT).payload == data


def test_the_cluster_side_runs_the_staged_model_without_tensorflow_tf2onnx_or_onnx(tmp_path):
    """A process modelled on a cluster without them: the guard makes their imports fail and records any
    attempt. Reading the staged model and running it with ONNX Runtime attempts none."""
    root = resolve(str(tmp_path / "assets"))
    staged = stage(prepared(tiny_onnx_model()), root)
    record = tmp_path / "imports.txt"
    guard = write_import_guard(tmp_path / "guard", record)
    script = (
        "import sys, numpy as np\n"
        "from fruit_assets.ml.staged_model import load_staged_from_environment\n"
        "from fruit_assets.ml.onnx_model import onnx_inference_function\n"
        "model = load_staged_from_environment()\n"
        "print(onnx_inference_function(model.payload)(np.ones((2, 224, 224, 3), np.float32)).tolist())\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {set(GUARDED_MODULES)!r}))\n"
    )
    env = os.environ | staged.environment() | {"PYTHONPATH": os.pathsep.join([str(guard), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    features, modules = done.stdout.strip().splitlines()
    np.testing.assert_allclose(json.loads(features), np.ones((2, 3)))
    assert modules == "[]" and not record.exists()

    # The guard works: the host-side conversion needs what the cluster lacks.
    probe = subprocess.run([sys.executable, "-c", "import tf2onnx"], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "not installed on this cluster" in probe.stderr
    assert record.read_text().split()[0] == "tf2onnx"
