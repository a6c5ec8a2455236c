"""The ONNX feature extractor staged in storage by the host, for a cluster that has no TensorFlow.

On Databricks (FRUIT_DEPLOYMENT=databricks) the host, where Dagster runs, resolves the weights and
converts the Keras model to ONNX (`featurize.prepare_feature_extractor`, with its on-disk cache), then
`stage`s the result beside the run's data: `<FRUIT_STORAGE_URI>/_models/<name>.onnx` and a JSON sidecar
`<name>.json` (the weights fingerprint, the file's sha256, the weights source and the converter's
versions). The name is the host cache's own: it holds the fingerprint and a tag of the converter
versions, so hosts with different converters never overwrite each other's file. The cluster step
`load_staged`s it: it never imports TensorFlow, tf2onnx or onnx, only ONNX Runtime (in the workers).

The host tells the step which model to load, and which fingerprint it computed, through two
environment variables of the step (`STAGED_MODEL_VARIABLE`, `STAGED_FINGERPRINT_VARIABLE`). A staged
model that is missing, altered, or of other weights is an error naming the path and both
fingerprints; the cluster never converts anything itself.

No Dagster here; storage goes through `fruit_assets.storage` (pyarrow: local folders and S3 alike).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow.fs as pafs

from fruit_assets.ml.featurize import PreparedModel, _version
from fruit_assets.storage import Location, resolve

MODELS_DIR = "_models"  # beside the asset tables; `_` names are ignored by Delta and Parquet readers
STAGED_MODEL_VARIABLE = "FRUIT_STAGED_MODEL"  # the staged .onnx file's URI, set by the host for the step
STAGED_FINGERPRINT_VARIABLE = "FRUIT_STAGED_MODEL_FINGERPRINT"  # the weights fingerprint the host computed


class StagedModelError(RuntimeError):
    """The staged model is missing, incomplete, altered or of other weights than the host's."""


@dataclass(frozen=True)
class StagedModel:
    uri: str  # of the .onnx file; its sidecar is the same name with .json
    fingerprint: str
    uploaded: bool  # False: the same file was staged already (an earlier run), nothing was written

    def environment(self) -> dict[str, str]:
        """What the step on the cluster needs to find and check it."""
        return {STAGED_MODEL_VARIABLE: self.uri, STAGED_FINGERPRINT_VARIABLE: self.fingerprint}


def _sidecar(location: Location) -> Location:
    return Location(
        uri=location.uri.removesuffix(".onnx") + ".json", filesystem=location.filesystem,
        path=location.path.removesuffix(".onnx") + ".json",
    )


def stage(model: PreparedModel, root: Location) -> StagedModel:
    """Host side: put the ONNX model of `model` (prepared for runtime onnxruntime) under `root/_models/`,
    unless the same file is there already. The model first, its sidecar last: a reader that finds the
    sidecar finds the whole model (each S3 PUT replaces an object whole)."""
    data = model.payload
    if not isinstance(data, bytes):
        raise TypeError("only a model prepared for runtime onnxruntime (ONNX bytes) can be staged")
    cached_name = posixpath.basename(str(model.metadata.get("onnx_model_file") or f"{model.fingerprint}.onnx"))
    target = root.child(MODELS_DIR, cached_name)
    sidecar = _sidecar(target)
    digest = hashlib.sha256(data).hexdigest()
    record = _read_json(sidecar)
    if record and record.get("fingerprint") == model.fingerprint and record.get("sha256") == digest:
        return StagedModel(target.uri, model.fingerprint, uploaded=False)
    if target.is_local:
        target.filesystem.create_dir(root.child(MODELS_DIR).path, recursive=True)
    with target.filesystem.open_output_stream(target.path) as stream:
        stream.write(data)
    described = {key: value for key, value in model.metadata.items() if key != "onnx_model_file"}
    record = {
        "fingerprint": model.fingerprint,
        "sha256": digest,
        "bytes": len(data),
        "meaningful": model.meaningful,
        "host_model_setup_seconds": round(model.seconds, 2),
        "metadata": described,  # weights source, converter versions and opset, the check against Keras
    }
    with sidecar.filesystem.open_output_stream(sidecar.path) as stream:
        stream.write(json.dumps(record, indent=1, sort_keys=True).encode())
    return StagedModel(target.uri, model.fingerprint, uploaded=True)


def _read_json(location: Location) -> dict | None:
    try:
        with location.filesystem.open_input_stream(location.path) as stream:
            record = json.loads(stream.read())
    except (FileNotFoundError, ValueError):
        return None
    except OSError as error:
        if location.filesystem.get_file_info(location.path).type == pafs.FileType.NotFound:
            return None
        raise error
    return record if isinstance(record, dict) else None


def load_staged(uri: str, fingerprint: str) -> PreparedModel:
    """Cluster side: the model the host staged at `uri`, checked against the fingerprint the host
    computed (and the sidecar's sha256); ONNX bytes ready to broadcast. Imports no TensorFlow, tf2onnx
    or onnx."""
    started = time.perf_counter()
    target = resolve(uri, setting=STAGED_MODEL_VARIABLE)
    sidecar = _sidecar(target)
    record = _staged_record(target, sidecar, fingerprint)
    data = _staged_bytes(target, sidecar, record, fingerprint)
    metadata = dict(record.get("metadata") or {})
    metadata |= {
        "runtime_version": f"onnxruntime {_version('onnxruntime', 'onnxruntime-gpu')}",  # the cluster's
        "onnx_model_file": target.uri,
        "onnx_model_prepared_on": "host",
        "host_model_setup_seconds": record.get("host_model_setup_seconds", 0.0),
    }
    return PreparedModel(data, fingerprint, metadata, time.perf_counter() - started, bool(record.get("meaningful")))


def _staged_record(target: Location, sidecar: Location, fingerprint: str) -> dict:
    """The staged model's record, if it is of the weights the host fingerprinted for this run."""
    record = _read_json(sidecar)
    if record is None:
        raise StagedModelError(
            f"the staged ONNX model's record {sidecar.uri} is missing or unreadable (expected weights fingerprint "
            f"{fingerprint}): the host stages the model before it launches the step; run the step again from "
            "the host, which stages it anew. The cluster never converts the model itself."
        )
    if record.get("fingerprint") != fingerprint:
        raise StagedModelError(
            f"the staged ONNX model {target.uri} is of weights fingerprint {record.get('fingerprint')!r}, but the "
            f"host computed {fingerprint!r} for this run: refusing to featurize with other weights. Run the "
            "step again from the host, which stages the model of its weights."
        )
    return record


def _staged_bytes(target: Location, sidecar: Location, record: dict, fingerprint: str) -> bytes:
    """The staged ONNX model's bytes, if their sha256 is the one its record holds."""
    try:
        with target.filesystem.open_input_stream(target.path) as stream:
            data = stream.read()
    except OSError as error:
        raise StagedModelError(
            f"the staged ONNX model {target.uri} (weights fingerprint {fingerprint}) cannot be read: {error}"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.get("sha256"):
        raise StagedModelError(
            f"the staged ONNX model {target.uri} does not match its record {sidecar.uri} (sha256 {digest[:16]}... "
            f"against {str(record.get('sha256'))[:16]}..., weights fingerprint {fingerprint}): it was altered or "
            "is incomplete. Run the step again from the host, which stages it anew."
        )
    return data


def load_staged_from_environment(environ: Mapping[str, str] = os.environ) -> PreparedModel:
    """`load_staged` of the model the host named in the step's environment; an error if it named none."""
    uri, fingerprint = environ.get(STAGED_MODEL_VARIABLE, "").strip(), environ.get(STAGED_FINGERPRINT_VARIABLE, "").strip()
    if not uri or not fingerprint:
        raise StagedModelError(
            f"no staged ONNX model: {STAGED_MODEL_VARIABLE} and {STAGED_FINGERPRINT_VARIABLE} are not set. On "
            "Databricks the host (FRUIT_DEPLOYMENT=databricks) converts the model and stages it under "
            f"<FRUIT_STORAGE_URI>/{MODELS_DIR}/ before it launches the step, and names it in the step's "
            "environment; this step was launched without it. The cluster never converts the model itself."
        )
    return load_staged(uri, fingerprint)
