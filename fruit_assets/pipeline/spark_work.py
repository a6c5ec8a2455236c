"""Incremental runs: what changed since the stored version, so that a run costs what changed.

- `plan_features`: which catalogued images need the model (new, replaced, or featurized by other
  weights or another model spec: the fingerprint covers both), which stored data files must go (those
  holding a row of a deleted or replaced image), and which of their other rows must be written again.
  Everything else stays where it is.
- `feature_statistics_since`: the PCA's sufficient statistics (row count, feature sums, Gram matrix)
  of the current `image_features`, from those of an earlier version plus the rows of the data files
  added since, minus those of the files removed since, read from the Delta log. It falls back to a
  full pass whenever that cannot be proven: no earlier statistics, another table, an earlier version
  that can no longer be read, other weights or model spec, or a row count that does not add up.

With them, the plain functions that do the Spark assets' work (their Dagster wiring is in `assets/`):
`featurize_incremental` (image_features), `fit_pca` (pca_model), `project_features` (reduced_features).

No Dagster here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.storagelevel import StorageLevel

from fruit_assets.ml.featurize import Featurizer, default_partitions
from fruit_assets.ml.pca import (
    PROJECTED_SCHEMA,
    FeatureStatistics,
    PcaConfigError,
    PcaResult,
    decompose,
    feature_statistics,
    project,
    project_batches,
    vectors_of,
)
from fruit_assets.ml.spec import ModelSpec
from fruit_assets.storage import delta, spark_io
from fruit_assets.storage.delta import Snapshot

SOURCE_VERSION = ["path", "size_bytes", "modified_at"]  # an image file, as it was when featurized
FEATURE_COLUMNS = ["path", "label", "features", "size_bytes", "modified_at", "weights_fingerprint"]  # as stored
FEATURE_SCHEMA = pa.schema([
    ("path", pa.string()), ("label", pa.string()), ("features", pa.list_(pa.float32())),
    ("size_bytes", pa.int64()), ("modified_at", pa.timestamp("us", tz="UTC")), ("weights_fingerprint", pa.string()),
])  # FEATURE_COLUMNS' types, as Spark writes them
FILE_COLUMN = "_file"
CATALOG_SCHEMA = "path string, label string, size_bytes long, modified_at timestamp"


@dataclass(frozen=True)
class FeaturePlan:
    """How to bring the stored `image_features` up to date with the catalog."""

    todo: pa.Table  # catalog rows to featurize
    reason: str  # why the plan is what it is, for the logs
    replace: bool = False  # rewrite the whole table (nothing stored, or nothing reusable)
    kept: DataFrame | None = None  # stored rows to write again: the other rows of the files that go
    kept_rows: int = 0  # rows in `kept`
    removed_files: tuple[str, ...] = ()  # stored data files to remove
    reused: int = 0  # stored rows that stay, in untouched files or in `kept`
    removed: int = 0  # stored rows that go: deleted images, and the old rows of replaced ones
    dropped: int = 0  # of those, the rows of images no longer catalogued (deleted)


def stored_keys(stored: Snapshot) -> pa.Table:
    """path, size_bytes, modified_at, weights_fingerprint and the data file of every stored row: the
    four small columns only, read by pyarrow from the version's files in parallel."""
    keys = stored.dataset().to_table(columns=[*SOURCE_VERSION, "weights_fingerprint", "__filename"])
    prefix = stored.location.path.rstrip("/") + "/"
    files = pc.utf8_slice_codeunits(keys.column("__filename"), len(prefix))
    return keys.set_column(keys.schema.get_field_index("__filename"), FILE_COLUMN, files)


@dataclass(frozen=True)
class StoredRows:
    """The stored keys split by whether their vector can be reused for the current catalog."""

    valid: pa.Table  # same file (path, size, modification time), same fingerprint, still catalogued
    stale: pa.Table  # every other stored row: deleted or replaced images, other weights or model spec
    dropped: int  # stale rows whose path is no longer catalogued at all
    key_types: pa.Schema  # the stored SOURCE_VERSION columns' types, to compare the catalog with


def split_stored_rows(stored: Snapshot, catalog: pa.Table, fingerprint: str) -> StoredRows:
    keys = stored_keys(stored)
    key_types = pa.schema([keys.schema.field(name) for name in SOURCE_VERSION])
    current = catalog.select(SOURCE_VERSION).cast(key_types).append_column("_catalogued", pa.repeat(True, catalog.num_rows))
    keys = keys.join(current, SOURCE_VERSION, join_type="left outer")  # _catalogued: null where the file changed or went
    is_valid = pc.and_(pc.equal(keys.column("weights_fingerprint"), fingerprint), pc.is_valid(keys.column("_catalogued")))
    stale = keys.filter(pc.invert(is_valid))
    dropped = int(pc.sum(pc.invert(pc.is_in(stale.column("path"), value_set=catalog.column("path")))).as_py() or 0)
    return StoredRows(keys.filter(is_valid), stale, dropped, key_types)


def _kept_rows(spark: SparkSession, stored: Snapshot, valid: pa.Table, removed_files: list[str]) -> tuple[DataFrame, int]:
    """The reusable rows of the data files that go, read by Spark: they are written again."""
    survivors = valid.filter(pc.is_in(valid.column(FILE_COLUMN), value_set=pa.array(removed_files)))
    wanted = F.broadcast(spark.createDataFrame(survivors.select(SOURCE_VERSION).to_pandas()))
    rows = spark_io.read_table(spark, stored, files=removed_files)
    return rows.join(wanted, on=SOURCE_VERSION, how="left_semi"), survivors.num_rows


def plan_features(spark: SparkSession, catalog: pa.Table, stored: Snapshot | None, fingerprint: str) -> FeaturePlan:
    """Reuse a stored vector when the same file (path, size, modification time) was featurized by the
    same weights and model spec (the fingerprint covers both); featurize everything else. Decided on the
    driver from the catalog and the stored keys (a hash join in Arrow); Spark reads only the vectors of
    the files that must be rewritten."""
    catalog = catalog.select(["path", "label", "size_bytes", "modified_at"])
    if stored is None:
        return FeaturePlan(catalog, "nothing stored yet", replace=True)
    missing = set(SOURCE_VERSION + ["weights_fingerprint", "features"]) - set(stored.schema.names)
    if missing:
        return FeaturePlan(catalog, f"the stored table has no {sorted(missing)}", replace=True, removed=stored.rows)
    rows = split_stored_rows(stored, catalog, fingerprint)
    stale = rows.stale.num_rows
    if stale == stored.rows:
        return FeaturePlan(catalog, "no stored vector is reusable (other weights or model spec, or every image changed)",
                           replace=True, removed=stale, dropped=rows.dropped)
    modified_at = catalog.schema.get_field_index("modified_at")
    catalog = catalog.cast(catalog.schema.set(modified_at, rows.key_types.field("modified_at")))
    todo = catalog.join(rows.valid.select(SOURCE_VERSION), SOURCE_VERSION, join_type="left anti")
    removed_files = sorted(set(rows.stale.column(FILE_COLUMN).to_pylist()))
    kept, kept_rows = _kept_rows(spark, stored, rows.valid, removed_files) if removed_files else (None, 0)
    reason = f"{stale} stored row(s) of deleted or replaced images in {len(removed_files)} file(s)" if stale else "no stored row to remove"
    return FeaturePlan(todo, reason, kept=kept, kept_rows=kept_rows, removed_files=tuple(removed_files),
                       reused=stored.rows - stale, removed=stale, dropped=rows.dropped)


@dataclass(frozen=True)
class StatisticsUpdate:
    statistics: FeatureStatistics
    mode: str  # "incremental" or "full"
    reason: str
    rows_read: int  # feature rows read to compute them


def _full(spark: SparkSession, features: Snapshot, reason: str) -> StatisticsUpdate:
    vectors = spark_io.read_table(spark, features, columns=["features"])
    statistics = feature_statistics(vectors, dimensions=feature_dimensions(features))
    return StatisticsUpdate(statistics, "full", reason, statistics.rows)


def feature_dimensions(features: Snapshot) -> int:
    """The length of the stored vectors: as recorded by the run that wrote them (their model spec's), or,
    for a version whose commit says nothing of it, the length of its first vector."""
    recorded = features.commit.get("feature_dim")
    if recorded:
        return int(recorded)
    first = features.dataset().head(1, columns=["features"]).column("features")
    if not len(first):
        raise ValueError("image_features holds no vectors: their dimension is unknown")
    return len(first[0])


def _why_not_incremental(features: Snapshot, previous_provenance: dict, earlier: Snapshot | None) -> str | None:
    if not previous_provenance:
        return "no earlier statistics"
    if previous_provenance.get("features_table_id") != features.table_id:
        return "the earlier statistics belong to another image_features table"
    if earlier is None:
        return f"image_features version {previous_provenance.get('features_version')} can no longer be read"
    if previous_provenance.get("weights_fingerprint") != features.commit.get("weights_fingerprint"):
        return "the features were computed with other weights or another model spec"
    return None


# An update that reads at most this many rows is summed on the driver, as Arrow batches: a Spark job
# (planning the data source read, starting Python workers) costs seconds, more than 24 new rows do.
DRIVER_UPDATE_ROWS = 50_000


def _statistics_of_files(spark: SparkSession, snapshot: Snapshot, paths: list[str], dimensions: int) -> FeatureStatistics:
    """The feature statistics of some data files of a version."""
    wanted = set(paths)
    rows = sum(f.rows for f in snapshot.files if f.path in wanted)
    if not paths:
        return FeatureStatistics.zeros(dimensions)
    if rows > DRIVER_UPDATE_ROWS:
        return feature_statistics(spark_io.read_table(spark, snapshot, files=paths, columns=["features"]), dimensions=dimensions)
    statistics = FeatureStatistics.zeros(dimensions)
    for batch in snapshot.dataset(paths).to_batches(columns=["features"], batch_size=spark_io.ROWS_PER_FILE):
        if batch.num_rows:
            statistics = statistics + FeatureStatistics.of(vectors_of(batch.column("features"), dimensions))
    return statistics


def feature_statistics_since(
    spark: SparkSession, features: Snapshot, previous: FeatureStatistics | None, previous_provenance: dict
) -> StatisticsUpdate:
    """The statistics of `features`, updated from `previous` (of the version named in
    `previous_provenance`) by the data files added and removed since; or a full pass."""
    earlier = None
    if previous is not None and previous_provenance.get("features_table_id") == features.table_id:
        try:
            earlier = delta.snapshot(features.location, int(previous_provenance["features_version"]))
        except Exception:
            earlier = None
    reason = _why_not_incremental(features, previous_provenance if previous is not None else {}, earlier)
    if reason:
        return _full(spark, features, reason)
    assert earlier is not None and previous is not None  # else there would be a reason
    before, now = {f.path for f in earlier.files}, {f.path for f in features.files}
    removed, added = sorted(before - now), sorted(now - before)
    to_read = sum(f.rows for f in earlier.files if f.path in removed) + sum(f.rows for f in features.files if f.path in added)
    if to_read >= features.rows:
        return _full(spark, features, f"an update would read {to_read} rows, a full pass {features.rows}")
    gone = [path for path in removed if not earlier.file_location(path).exists()]
    if gone:
        return _full(spark, features, f"{len(gone)} removed data file(s) were already vacuumed")
    dimensions = previous.dimensions  # the same model's (same fingerprint), so the stored vectors' length
    minus = _statistics_of_files(spark, earlier, removed, dimensions)
    plus = _statistics_of_files(spark, features, added, dimensions)
    statistics = previous - minus + plus
    if statistics.rows != features.rows:
        return _full(spark, features, f"the updated row count {statistics.rows} is not the table's {features.rows}")
    return StatisticsUpdate(
        statistics,
        "incremental",
        f"{len(added)} data file(s) added and {len(removed)} removed since version {earlier.version}",
        minus.rows + plus.rows,
    )


def provenance(features: Snapshot) -> dict:
    """What statistics computed from `features` were computed from: stored with the PCA."""
    return {
        "features_table_id": features.table_id,
        "features_version": features.version,
        "weights_fingerprint": features.commit.get("weights_fingerprint"),
    }


@dataclass(frozen=True)
class FeaturizeResult:
    """What an incremental run of image_features did, and the change to commit."""

    change: spark_io.TableChange
    cached: DataFrame | None  # Spark's featurized rows, cached until the change is written: `release` after
    catalogued: int
    featurized: int  # images through the model, with a vector now
    reused: int
    removed: int
    dropped: int
    skipped: pd.DataFrame  # path, label, error of the images that could not be featurized
    bad_vectors: int  # new vectors that are not the model spec's output_dim finite floats
    partitions: int  # of the Spark job (0: featurized on the driver)
    where: str  # "driver" or "spark"
    plan_reason: str
    seconds: dict  # per phase: plan, featurize

    @property
    def rows(self) -> int:
        return self.featurized + self.reused

    @property
    def skipped_fraction(self) -> float:
        return len(self.skipped) / self.catalogued if self.catalogued else 0.0

    def release(self) -> None:
        if self.cached is not None:
            self.cached.unpersist()

    def __enter__(self) -> FeaturizeResult:
        return self

    def __exit__(self, *exc_info) -> None:
        """Spark's cached rows go once the change is written (or the run failed)."""
        self.release()

    @classmethod
    def of(cls, plan: FeaturePlan, *, change: spark_io.TableChange, cached: DataFrame | None, rows: int, featurized: int,
           skipped: pd.DataFrame, bad_vectors: int, partitions: int, where: str) -> FeaturizeResult:
        """The result of featurizing `plan.todo` (`rows` of them), with the plan's counts."""
        return cls(change=change, cached=cached, catalogued=plan.reused + rows, featurized=featurized, reused=plan.reused,
                   removed=plan.removed, dropped=plan.dropped, skipped=skipped, bad_vectors=bad_vectors,
                   partitions=partitions, where=where, plan_reason=plan.reason, seconds={})


def _finite_vectors(dimensions: int):
    finite = F.forall("features", lambda x: ~F.isnan(x) & (F.abs(x) < float("inf")))
    return F.col("features").isNotNull() & ((F.size("features") != dimensions) | ~finite)


def _commit_metadata(fingerprint: str, spec: ModelSpec) -> dict:
    """In image_features' commit: what this version's vectors were computed with, and their length (the
    PCA reads it)."""
    return {"weights_fingerprint": fingerprint, "model_spec": spec.name, "feature_dim": spec.output_dim}


def _feature_change(
    results: DataFrame, plan: FeaturePlan, stored: Snapshot | None, fingerprint: str, spec: ModelSpec, partitions: int,
    featurized: int,
) -> spark_io.TableChange:
    """The commit of a featurization: the new vectors and the rows kept from rewritten files, in as
    many files as they need (a few new images: one small file) but no more than the cores."""
    new_rows = results.where(F.col("error").isNull()).withColumn("weights_fingerprint", F.lit(fingerprint)).select(*FEATURE_COLUMNS)
    if plan.kept is not None:
        new_rows = new_rows.unionByName(plan.kept.select(*FEATURE_COLUMNS))
    write_partitions = max(1, min(partitions, -(-(featurized + plan.kept_rows) // spark_io.ROWS_PER_FILE)))
    return spark_io.TableChange(
        rows=new_rows.coalesce(write_partitions),
        base=stored,
        removed=list(plan.removed_files),
        replace=plan.replace,
        commit_metadata=_commit_metadata(fingerprint, spec),
    )


# At most this many images to featurize: the driver runs the model on them itself (`featurize_here`:
# the same code and runtime settings as a Spark worker, so the same vectors). The first Spark job of a
# run (Python workers started, the model broadcast to them and built in each) costs about 12 s on
# 2 cores; a few dozen images on the driver, about a second (BENCHMARKS.md, incremental runs).
DRIVER_FEATURIZE_IMAGES = 64


def featurize_incremental(
    spark: SparkSession,
    catalog: pa.Table,
    stored: Snapshot | None,
    featurizer: Featurizer,
    *,
    progress: Callable[[int], AbstractContextManager] | None = None,
) -> FeaturizeResult:
    """Plan (`plan_features`), featurize the images that need it with the featurizer's model, and return
    the change to commit: the new vectors and the stored rows kept from rewritten files, added; the files
    holding deleted or replaced images, removed. Up to DRIVER_FEATURIZE_IMAGES images are featurized on
    the driver when the featurizer can run there; more in Spark. Use the result in a `with` block: it
    holds Spark's cached rows until the change is written."""
    started = time.perf_counter()
    plan = plan_features(spark, catalog, stored, featurizer.model.fingerprint)
    planned = time.perf_counter()
    if featurizer.runs_on_driver and plan.todo.num_rows <= DRIVER_FEATURIZE_IMAGES:
        result = _featurize_on_driver(spark, plan, stored, featurizer)
    else:
        result = _featurize_in_spark(spark, plan, stored, featurizer, progress)
    return replace(result, seconds={"plan": round(planned - started, 2), "featurize": round(time.perf_counter() - planned, 2)})


def _featurize_in_spark(spark, plan: FeaturePlan, stored: Snapshot | None, featurizer: Featurizer, progress) -> FeaturizeResult:
    todo, spec, fingerprint = plan.todo.num_rows, featurizer.model.spec, featurizer.model.fingerprint
    partitions = default_partitions(spark, todo)
    rows = spark.createDataFrame(plan.todo.to_pandas(), schema=CATALOG_SCHEMA)
    results = featurizer.in_spark(rows, partitions).persist(StorageLevel.MEMORY_AND_DISK)
    with progress(todo) if progress else nullcontext():
        [stats] = results.agg(
            F.count("*").alias("rows"),
            F.count("features").alias("featurized"),
            F.sum(F.when(_finite_vectors(spec.output_dim), 1).otherwise(0)).alias("bad_vectors"),
        ).collect()  # a global aggregate: one row
    skipped = results.where(F.col("error").isNotNull()).select("path", "label", "error").toPandas()
    featurized = stats["featurized"] or 0
    return FeaturizeResult.of(
        plan, change=_feature_change(results, plan, stored, fingerprint, spec, partitions, featurized), cached=results,
        rows=stats["rows"] or 0, featurized=featurized, skipped=skipped, bad_vectors=stats["bad_vectors"] or 0,
        partitions=partitions, where="spark",
    )


def _featurize_on_driver(spark, plan: FeaturePlan, stored: Snapshot | None, featurizer: Featurizer) -> FeaturizeResult:
    spec, fingerprint = featurizer.model.spec, featurizer.model.fingerprint
    results = featurizer.on_driver(plan.todo.select(["path", "label", "size_bytes", "modified_at"]).to_pandas())
    ok = results.error.isna().to_numpy()
    vectors = [np.asarray(v, dtype=np.float32) for v in results.features[ok]]
    bad_vectors = sum(1 for v in vectors if v.shape != (spec.output_dim,) or not np.isfinite(v).all())
    new_rows = (
        pa.Table.from_pandas(results.loc[ok, ["path", "label", "size_bytes", "modified_at"]], preserve_index=False)
        .append_column("features", pa.array(vectors, type=pa.list_(pa.float32())))
        .append_column("weights_fingerprint", pa.array([fingerprint] * len(vectors), type=pa.string()))
        .select(FEATURE_COLUMNS)
        .cast(FEATURE_SCHEMA)
    )
    rows: DataFrame | pa.Table = new_rows
    if plan.kept is not None:  # stored rows to write again, read by Spark: the new ones join them there
        kept = plan.kept.select(*FEATURE_COLUMNS)
        rows = kept.unionByName(spark.createDataFrame(new_rows.to_pandas(), schema=kept.schema))
    change = spark_io.TableChange(rows, stored, list(plan.removed_files), plan.replace, _commit_metadata(fingerprint, spec))
    skipped = results.loc[~ok, ["path", "label", "error"]].reset_index(drop=True)
    return FeaturizeResult.of(plan, change=change, cached=None, rows=len(results), featurized=len(vectors), skipped=skipped,
                              bad_vectors=bad_vectors, partitions=0, where="driver")


def refuse_impossible_k(features: Snapshot, k: int | None) -> None:
    """Before any statistics are summed: a k over the features' dimension (their model spec's) or over the
    number of images cannot be fitted (`decompose` would refuse it too, after the work)."""
    dimensions = feature_dimensions(features)
    if k is not None and not 1 <= k <= min(features.rows, dimensions):
        raise PcaConfigError(
            f"k={k} is out of range: it must be between 1 and min(number of images={features.rows}, feature "
            f"dimensions={dimensions} of model spec {features.commit.get('model_spec', 'unrecorded')}); lower k or "
            "set k to null and use variance_target"
        )


@dataclass(frozen=True)
class PcaFit:
    result: PcaResult
    update: StatisticsUpdate
    seconds: dict  # statistics, decomposition


def fit_pca(
    spark: SparkSession, features: Snapshot, previous: PcaResult | None, k: int | None, variance_target: float, max_k: int
) -> PcaFit:
    """The PCA of `features`: statistics updated from `previous` (or summed afresh), decomposed by numpy."""
    refuse_impossible_k(features, k)
    started = time.perf_counter()
    update = feature_statistics_since(spark, features, previous.statistics if previous else None, previous.provenance if previous else {})
    summed = time.perf_counter()
    result = replace(decompose(update.statistics, k, variance_target, max_k), provenance=provenance(features))
    seconds = {"statistics": round(summed - started, 2), "decomposition": round(time.perf_counter() - summed, 2)}
    return PcaFit(result, update, seconds)


@dataclass(frozen=True)
class Projection:
    """The projected rows and what the check needs. Spark rows are cached until written: `release` after."""

    rows: DataFrame | pa.Table  # path, label, pca_features
    count: int
    min_k: int
    max_k: int
    sample: pd.DataFrame  # label, xy: the first two coordinates of up to `sample_size` rows
    where: str  # "driver" or "spark"

    def release(self) -> None:
        if isinstance(self.rows, DataFrame):
            self.rows.unpersist()


# A table of at most this many rows is projected on the driver, read as Arrow batches: for a small
# table a Spark job (planning the read, starting Python workers, moving every row between the JVM and
# Python twice) costs more than the projection itself. 100,000 vectors are 500 MB read in batches.
DRIVER_PROJECTION_ROWS = 100_000


def project_features(spark: SparkSession, features: Snapshot, result: PcaResult, sample_size: int) -> Projection:
    """Every stored feature vector projected on the components: one read of the features, no shuffle;
    on the driver for a table of up to DRIVER_PROJECTION_ROWS rows, else in Spark."""
    if features.rows <= DRIVER_PROJECTION_ROWS:
        return _project_on_driver(features, result, sample_size)
    vectors = spark_io.read_table(spark, features, columns=["path", "label", "features"])
    rows = project(vectors, result.components).persist(StorageLevel.MEMORY_AND_DISK)
    [stats] = rows.agg(
        F.count("*").alias("rows"), F.min(F.size("pca_features")).alias("min_k"), F.max(F.size("pca_features")).alias("max_k")
    ).collect()  # a global aggregate: one row
    sample = rows.select("label", F.slice("pca_features", 1, 2).alias("xy")).limit(sample_size).toPandas()
    return Projection(rows, stats["rows"], stats["min_k"], stats["max_k"], sample, "spark")


def _project_on_driver(features: Snapshot, result: PcaResult, sample_size: int) -> Projection:
    batches = features.dataset().to_batches(columns=["path", "label", "features"], batch_size=spark_io.ROWS_PER_FILE)
    rows = pa.Table.from_batches(project_batches(batches, result.components), schema=PROJECTED_SCHEMA)
    lengths = pc.list_value_length(rows.column("pca_features"))
    head = rows.slice(0, sample_size)
    sample = pd.DataFrame({
        "label": head.column("label").to_pylist(),
        "xy": [np.asarray(v[:2], dtype=np.float32) for v in head.column("pca_features").to_pylist()],
    })
    return Projection(rows, rows.num_rows, pc.min(lengths).as_py() or 0, pc.max(lengths).as_py() or 0, sample, "driver")
