"""The demo: generate the demo image set, materialize the four assets, print what was made.

    python -m fruit_assets.demo [--labels 24] [--images-per-label 3]

Runs on the embedded default (local Spark, local folders) unless FRUIT_* variables say otherwise.
When FRUIT_IMAGES_URI is unset, the demo set is generated into data/demo first.

Weights: FRUIT_MODEL_WEIGHTS as set. When it is unset, the demo tries ImageNet weights (Keras cache or
download) and, if they cannot be had (no internet), says so loudly and uses the deterministic random
initialisation `random:0`, which the asset metadata records. Outside the demo there is no such
fallback: an unavailable `imagenet` fails the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time


RANDOM_FALLBACK = "random:0"


def _banner(paragraphs: list[str]) -> None:
    lines = [line for text in paragraphs for line in (textwrap.wrap(text, 96) or [""])]
    width = max(len(line) for line in lines) + 4
    print("\n" + "!" * width, file=sys.stderr)
    for line in lines:
        print(f"! {line.ljust(width - 4)} !", file=sys.stderr)
    print("!" * width + "\n", file=sys.stderr)


def choose_weights() -> str:
    configured = os.environ.get("FRUIT_MODEL_WEIGHTS", "").strip()
    if configured:
        return configured
    from fruit_assets.ml.model import WeightsSource, WeightsUnavailableError, build_feature_extractor

    try:
        build_feature_extractor(WeightsSource("imagenet"))
        return "imagenet"
    except WeightsUnavailableError as error:
        _banner(
            [
                str(error),
                "",
                f"The demo continues with FRUIT_MODEL_WEIGHTS={RANDOM_FALLBACK}: a deterministic random "
                "initialisation. The pipeline runs end to end, but the features are NOT meaningful.",
            ]
        )
        return RANDOM_FALLBACK


def _dataset_shape(uri: str, column: str | None = None) -> str:
    """Rows (and vector width) of a stored asset's latest version, read with deltalake: no Spark needed."""
    from fruit_assets.storage import delta
    from fruit_assets.storage import resolve

    table = delta.read_arrow(resolve(uri), columns=[column] if column else None)
    if column is None or table.num_rows == 0:
        return f"{table.num_rows} rows"
    return f"{table.num_rows} x {len(table.column(column)[0])}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fruit_assets.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=24, help="labels in the generated demo set")
    parser.add_argument("--images-per-label", type=int, default=3, help="images per label in the demo set")
    args = parser.parse_args(argv)

    from dagster import DagsterInstance, materialize

    from fruit_assets.definitions import all_assets_and_checks
    from fruit_assets.demo_data import generate_demo_set
    from fruit_assets.ml.featurize import FeaturizeSettings
    from fruit_assets.resources import FeatureModel, build_resources, default_images_uri, env_or_default

    started = time.perf_counter()
    if not os.environ.get("FRUIT_IMAGES_URI"):
        written = generate_demo_set(default_images_uri(), args.labels, args.images_per_label)
        print(f"demo set: {len(written)} images ({args.labels} labels x {args.images_per_label}) in {default_images_uri()}")

    weights = choose_weights()
    resources = build_resources()
    resources["feature_model"] = FeatureModel(
        weights=weights, runtime=env_or_default("FRUIT_MODEL_RUNTIME", FeaturizeSettings.runtime)
    )
    instance = DagsterInstance.get() if os.environ.get("DAGSTER_HOME") else DagsterInstance.ephemeral()
    result = materialize(
        all_assets_and_checks,
        resources=resources,
        instance=instance,
        run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        raise_on_error=False,
    )
    if not result.success:
        print("\nthe demo run FAILED: see the errors above", file=sys.stderr)
        return 1

    metadata = {
        event.asset_key.to_user_string(): {key: value.value for key, value in event.materialization.metadata.items()}
        for event in result.get_asset_materialization_events()
    }
    features, pca = metadata["image_features"], metadata["pca_model"]
    print(f"\nfruit_assets demo: 4 assets materialized in {time.perf_counter() - started:.0f} s (run {result.run_id})")
    print(f"  images           {metadata['raw_images']['images_uri']} ({metadata['raw_images']['rows']} images, {metadata['raw_images']['labels']} labels)")
    print(f"  weights          {features['weights_source']}" + ("" if features["weights_meaningful"] else "  (NOT meaningful: random initialisation)"))
    print(f"  featurization    {features['throughput_images_per_s']} images/s with {features['runtime']}, {features['skipped']} skipped")
    print(f"  PCA              k={pca['k']}, explained variance {pca['explained_variance_total']:.1%} (target {pca['variance_target']:.0%})")
    for name, column in [("raw_images", None), ("image_features", "features"), ("pca_model", "loadings"), ("reduced_features", "pca_features")]:
        uri = metadata[name]["path"]
        print(f"  {name:<16} {_dataset_shape(uri, column):<12} {uri}")
    print(f"\nread them without Spark, e.g.: deltalake.DeltaTable({metadata['image_features']['path']!r}).to_pandas()")
    return 0


if __name__ == "__main__":
    sys.exit(main())
