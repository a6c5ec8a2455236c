"""The demo: generate the demo image set, materialize the four assets, print what was made.

    python -m fruit_assets_dev.demo [--labels 24] [--images-per-label 3] [--verbose]

Runs on the embedded default (local Spark, local folders) unless FRUIT_* variables say otherwise.
When FRUIT_IMAGES_URI is unset, the demo set is generated into data/demo first.

Weights: FRUIT_MODEL_WEIGHTS as set. When it is unset, the demo tries ImageNet weights (Keras cache or
download) and, if they cannot be had (no internet), says so loudly and uses the deterministic random
initialisation `random:0`, which the asset metadata records. Outside the demo there is no such
fallback: an unavailable `imagenet` fails the run.

The run is recorded in a Dagster instance: $DAGSTER_HOME if set, else `.dagster_home/` in the checkout,
which `dagster dev` opens when started as the last line of the summary says. There its
materializations, plots and check results can be seen.

Quiet by default: the summary, and warnings that mean something (random weights, skipped images, a PCA
below its variance target), once each. `--verbose` (or FRUIT_VERBOSE=1) shows Dagster's log and the
libraries' own start-up messages.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # before the heavy imports below: start-up includes them

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from fruit_assets.plumbing import quiet  # noqa: E402

RANDOM_FALLBACK = "random:0"
UI_URL = "http://127.0.0.1:3000"
INSTANCE_FOLDER = ".dagster_home"
INSTANCE_CONFIG = """\
# The Dagster instance of this checkout, made by `python -m fruit_assets_dev.demo`, which records its runs
# here. `DAGSTER_HOME=$PWD/.dagster_home .venv/bin/dagster dev` shows them (README, "Running it").
# Edit freely: the demo never rewrites this file.
telemetry:
  enabled: false  # Dagster's anonymous usage statistics; set true to send them
"""
# Hints printed with a check that did not pass, in plain words.
CHECK_HINTS = {
    "explained_variance_reaches_target": "to let the target choose k, run pca_model with config k: null "
    "(README, 'Run configuration')",
}


@dataclass
class Timings:
    """Seconds since the process started, at the points the summary splits the total at."""

    images: float = 0.0  # spent generating the demo set (part of "the rest")
    weights: float = 0.0  # spent choosing the weights (part of model set-up)
    run_started: float = 0.0  # the Dagster run began; Spark and its Python workers were up by then


def _elapsed() -> float:
    return time.perf_counter() - _STARTED


def _banner(lines: list[str]) -> None:
    print("\n".join(f"!! {line}" for line in lines), file=sys.stderr, flush=True)


def choose_weights() -> str:
    """FRUIT_MODEL_WEIGHTS if set; else imagenet if Keras has or can download the weights; else
    random:0, with a banner that says so and how to get real weights."""
    configured = os.environ.get("FRUIT_MODEL_WEIGHTS", "").strip()
    if configured:
        return configured
    from fruit_assets.ml.model import (
        IMAGENET_NO_TOP_WEIGHTS_FILE,
        WeightsSource,
        WeightsUnavailableError,
        build_feature_extractor,
    )

    try:
        build_feature_extractor(WeightsSource("imagenet"))  # no download progress bar (plumbing/quiet.py)
        return "imagenet"
    except WeightsUnavailableError as error:
        reason = str(error.__cause__ or error).rsplit(" -- ", 1)[-1]
        _banner(
            [
                f"No ImageNet weights: Keras could not download them ({reason}).",
                f"The demo goes on with FRUIT_MODEL_WEIGHTS={RANDOM_FALLBACK}, a deterministic random model: "
                "its features are NOT meaningful.",
                f"For real features, put {IMAGENET_NO_TOP_WEIGHTS_FILE} in ~/.keras/models/ "
                "or set FRUIT_MODEL_WEIGHTS=/path/to/it.h5 (README, 'Configuration').",
            ]
        )
        return RANDOM_FALLBACK


def _dataset_shape(uri: str, column: str | None = None) -> str:
    """Rows (and vector width) of a stored asset's latest version, read with deltalake: no Spark needed."""
    from fruit_assets.storage import delta, resolve

    table = delta.read_arrow(resolve(uri), columns=[column] if column else None)
    if column is None or table.num_rows == 0:
        return f"{table.num_rows} rows"
    return f"{table.num_rows} x {len(table.column(column)[0])}"


def _instance_home() -> Path:
    """$DAGSTER_HOME, or the checkout's `.dagster_home/` (made now, with a dagster.yaml), which then
    becomes $DAGSTER_HOME for this process."""
    from fruit_assets.resources import project_dir

    home = Path(os.environ.get("DAGSTER_HOME") or project_dir() / INSTANCE_FOLDER)
    if home.name == INSTANCE_FOLDER or not home.exists() or not any(home.iterdir()):
        # Ours, or a new folder: made with its dagster.yaml (Dagster refuses a missing folder, and
        # without the file it prints a warning and its telemetry notice at every run).
        home.mkdir(parents=True, exist_ok=True)
        config = home / "dagster.yaml"
        if not config.exists():
            config.write_text(INSTANCE_CONFIG)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _demo_resources(weights: str) -> dict:
    from fruit_assets.resources import FeatureModel, LocalSpark, build_resources

    resources = build_resources()
    if weights != os.environ.get("FRUIT_MODEL_WEIGHTS", "").strip():
        resources["feature_model"] = FeatureModel(weights=weights)  # the fallback; else from the variable
    if isinstance(resources["pyspark"], LocalSpark):
        # The demo's process ends with its run: nobody could open a Spark UI.
        resources["pyspark"] = LocalSpark(spark_config={"spark.ui.enabled": "false"})
    return resources


def warm_up(resources: dict) -> None:
    """Start Spark and one Python worker per core now, with the inference runtime imported, so that
    the summary counts them as start-up and featurization is featurization. Spark reuses the workers."""
    from fruit_assets.resources import LocalSpark

    if not isinstance(resources["pyspark"], LocalSpark):
        return
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    from fruit_assets.plumbing.spark_connect import default_parallelism

    spark = resources["pyspark"].session()
    runtime = resources["feature_model"].runtime.strip().lower()
    module = {"onnxruntime": "onnxruntime", "tensorflow": "tensorflow"}.get(runtime)

    def ready(batches):
        import importlib

        import fruit_assets.ml.featurize  # noqa: F401

        if module:
            importlib.import_module(module)
        yield from batches

    # A scalar-iterator pandas UDF, as featurization's, so that the JVM's side of it is warm too. Its
    # type hints given as objects: this module's annotations are strings.
    ready.__annotations__ = {"batches": Iterator[pd.Series], "return": Iterator[pd.Series]}
    cores = default_parallelism(spark)
    warm = pandas_udf(ready, "long")  # type: ignore[call-overload]  # pyspark's overloads miss this form
    spark.range(cores, numPartitions=cores).select(warm("id")).collect()


def _images_line(args: argparse.Namespace) -> str:
    """Generates the demo set when FRUIT_IMAGES_URI is unset; says what is about to run."""
    from fruit_assets.resources import default_images_uri
    from fruit_assets_dev.demo_data import generate_demo_set

    running = "materializing the four assets on local Spark (about a minute) ..."
    if os.environ.get("FRUIT_IMAGES_URI"):
        return f"images: {os.environ['FRUIT_IMAGES_URI']}; {running}"
    written = generate_demo_set(default_images_uri(), args.labels, args.images_per_label)
    where = _shown_path(default_images_uri())
    return f"demo set: {len(written)} images ({args.labels} labels x {args.images_per_label}) in {where}; {running}"


def _shown_path(uri: str) -> str:
    """A local path relative to the working directory when it is inside it (shorter); else as it is."""
    if "://" in uri:
        return uri
    relative = os.path.relpath(uri)
    return uri if relative.startswith("..") else relative


def run_demo(resources: dict, verbose: bool, timings: Timings):
    """Materialize the four assets with their checks into the instance; (result, instance)."""
    from dagster import DagsterInstance, materialize

    from fruit_assets.definitions import all_assets_and_checks

    instance = DagsterInstance.get()
    timings.run_started = _elapsed()
    result = materialize(
        all_assets_and_checks,
        resources=resources,
        instance=instance,
        # Quiet: what matters is printed after the run, from the run's own records.
        run_config={"loggers": {"console": {"config": {"log_level": "INFO" if verbose else "CRITICAL"}}}},
        raise_on_error=False,
    )
    return result, instance


def metadata_by_asset(result) -> dict[str, dict]:
    return {
        event.asset_key.to_user_string(): {key: value.value for key, value in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }


def run_warnings(result, instance, metadata: dict[str, dict], already_said: str | None) -> list[str]:
    """The run's warnings, once each, in plain words: what the assets logged as warnings, images that
    were skipped, checks that did not pass. `already_said`: a warning the banner gave already."""
    lines = []
    for entry in instance.all_logs(result.run_id):
        if entry.is_dagster_event or not isinstance(entry.level, int) or entry.level < logging.WARNING:
            continue
        if already_said and already_said in entry.user_message:
            continue
        lines.append(f"warning: {entry.step_key}: {entry.user_message}")
    features = metadata.get("image_features", {})
    if features.get("skipped"):
        first = features["skipped_images"].records[0].data
        lines.append(
            f"warning: {features['skipped']} image(s) could not be featurized and were skipped, listed with their "
            f"reason in image_features' metadata; the first: {first['path']}: {first['error']}"
        )
    for evaluation in result.get_asset_check_evaluations():
        if not evaluation.passed:
            hint = CHECK_HINTS.get(evaluation.check_name)
            lines.append(
                f"warning: check {evaluation.check_name} of {evaluation.asset_key.to_user_string()} did not pass: "
                f"{evaluation.description}" + (f"; {hint}" if hint else "")
            )
    return list(dict.fromkeys(lines))


def failure_lines(result) -> list[str]:
    """What went wrong, from the failed run's events."""
    lines = []
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if error is not None and event.is_failure:
            lines.append(f"  {event.step_key or 'run'}: {error.message.strip()}")
    return list(dict.fromkeys(lines)) or ["  (no error recorded: run again with --verbose)"]


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def summary_lines(result, metadata: dict[str, dict], timings: Timings, total: float, ui_command: str) -> list[str]:
    """The summary: what was made, where, and where the time went."""
    features, pca = metadata["image_features"], metadata["pca_model"]
    # Model set-up: choosing the weights, preparing the model on the driver (conversion or cache), and
    # each Spark worker building its runtime session. Featurization: the model running.
    worker_setup = float(features.get("worker_model_setup_seconds", 0.0))
    model_setup = timings.weights + float(features.get("model_setup_seconds", 0.0)) + worker_setup
    featurizing = max(float(features.get("featurize_seconds", 0.0)) - worker_setup, 0.0)
    start_up = max(timings.run_started - timings.weights - timings.images, 0.0)
    rest = max(total - start_up - model_setup - featurizing, 0.0)
    rate = features.get("throughput_after_model_setup_images_per_s", features.get("throughput_images_per_s", 0.0))
    weights = features["weights_source"]
    lines = [
        f"fruit_assets demo: 4 assets materialized in {_seconds(total)} (run {result.run_id.split('-')[0]})",
        f"  time             start-up {_seconds(start_up)} (Spark, workers), model set-up {_seconds(model_setup)}, "
        f"featurization {_seconds(featurizing)} ({rate:.0f} images/s), the rest {_seconds(rest)}",
        f"  weights          {weights} with {features['runtime']}"
        + ("" if features["weights_meaningful"] else "  (NOT meaningful: random initialisation)"),
        f"  PCA              k={pca['k']}, explained variance {pca['explained_variance_total']:.1%} "
        f"(target {pca['variance_target']:.0%})",
    ]
    for name, column in [("raw_images", None), ("image_features", "features"), ("pca_model", "loadings"),
                         ("reduced_features", "pca_features")]:
        uri = metadata[name]["path"]
        lines.append(f"  {name:<16} {_dataset_shape(uri, column):<12} {_shown_path(uri)}")
    lines.append(f"open them in the Dagster UI (runs, plots, checks): {ui_command}, then {UI_URL}")
    return lines


def ui_command(home: Path) -> str:
    """The command that opens this instance in the UI, as the README writes it."""
    dagster = Path(sys.executable).with_name("dagster")
    shown_dagster = _shown_path(str(dagster)) if dagster.exists() else "dagster"
    if home == Path.cwd() / INSTANCE_FOLDER:
        return f"DAGSTER_HOME=$PWD/{INSTANCE_FOLDER} {shown_dagster} dev"
    return f"DAGSTER_HOME={home} {shown_dagster} dev"


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fruit_assets_dev.demo", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=24, help="labels in the generated demo set")
    parser.add_argument("--images-per-label", type=int, default=3, help="images per label in the demo set")
    parser.add_argument(
        "--verbose", action="store_true",
        help="show Dagster's run log and the libraries' start-up messages (same as FRUIT_VERBOSE=1)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.verbose:
        os.environ[quiet.VERBOSE_VARIABLE] = "1"
    verbose = quiet.verbose()
    quiet.configure_environment()  # before TensorFlow is imported and Spark started
    timings = Timings()

    images_started = _elapsed()
    print(_images_line(args), flush=True)
    timings.images = _elapsed() - images_started
    home = _instance_home()

    weights_started = _elapsed()
    weights = choose_weights()
    timings.weights = _elapsed() - weights_started

    resources = _demo_resources(weights)
    warm_up(resources)
    result, instance = run_demo(resources, verbose, timings)
    return _report(result, instance, timings, total=_elapsed(), home=home)


def _report(result, instance, timings: Timings, *, total: float, home: Path) -> int:
    """Print how the demo run went: its failure, or its warnings and summary. The exit status."""
    if not result.success:
        print("the demo run FAILED:", file=sys.stderr)
        print("\n".join(failure_lines(result)), file=sys.stderr)
        print(f"its full log: {ui_command(home)}, then {UI_URL} (or run again with --verbose)", file=sys.stderr)
        return 1
    metadata = metadata_by_asset(result)
    # The weights line of the summary (and the banner, after a fall-back) already says it.
    already_said = None if metadata["image_features"].get("weights_meaningful", True) else "featurizing with "
    for line in run_warnings(result, instance, metadata, already_said):
        print(line, file=sys.stderr)
    print("\n" + "\n".join(summary_lines(result, metadata, timings, total, ui_command(home))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
