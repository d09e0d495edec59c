"""Batch scoring of a registered Keel model through Spark, for inputs one machine cannot hold.

Same contract as :mod:`pipelines.score` (the local job), so the two are interchangeable:

* same model (any ``models:/``/``runs:/`` URI), same signature check, same rows out: the
  predictor's columns plus ``input_row`` (the row's position in the input file), rejects
  (rows with a non-null ``reject_reason``) in a separate rejects output, nothing dropped;
* row-independent models run through ``mlflow.pyfunc.spark_udf`` (``env_manager`` chooses
  the executors' Python environment); models whose metadata declares
  ``scoring_metadata = {"group_column": ...}`` run through ``groupBy(group).applyInPandas``
  so every group (one card, one asset) reaches the predictor whole and in input order;
  ``mode="partitions"`` scores whole partitions with ``mapInPandas`` for predictors whose
  output rows are not one per input row (e.g. one row per nodule candidate);
* atomic: Spark writes into a temp folder beside the output, which is renamed into place
  (through the Hadoop FileSystem API, so this holds on HDFS as on local disks); an
  existing output is refused unless ``overwrite``;
* the scoring run is logged to MLflow like the local job's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.score import (
    REJECT_COLUMN,
    OutputLock,
    ScoreReport,
    ScoringError,
    _log_scoring_run,
    _resolve_version,
    check_columns,
    file_fingerprint,
)

log = logging.getLogger(__name__)

ROW_ID = "input_row"
MODES = ("auto", "udf", "grouped", "partitions")
DEFAULT_MASTER = "local[2]"


# ---------------------------------------------------------------------- session
def spark_session(master: str | None = DEFAULT_MASTER, conf: dict[str, str] | None = None) -> Any:
    """A SparkSession for scoring; ``master=None`` keeps the one spark-submit configured.

    Local masters run the Python workers with this interpreter (so they see the same
    packages as the driver); on a cluster the executors' Python comes from the cluster
    config (``spark.pyspark.python``), see docs/scoring_at_scale.md.
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("keel-score")
    if master is None and "PYSPARK_GATEWAY_PORT" not in os.environ:
        master = DEFAULT_MASTER  # not under spark-submit: nothing else would set one
    if master is not None:
        builder = builder.master(master)
        if master.startswith("local"):
            # local Python workers are started from PYSPARK_PYTHON (default: python3 on PATH)
            os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


# ---------------------------------------------------------------------- file system
class _HadoopFS:
    """exists / rename / delete through Hadoop's FileSystem: one code path for file://,
    hdfs://, s3a://; ``rename`` of a folder is atomic on local disks and HDFS."""

    def __init__(self, spark: Any):
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _path(self, uri: str) -> tuple[Any, Any]:
        p = self._jvm.org.apache.hadoop.fs.Path(uri)
        return p.getFileSystem(self._conf), p

    def exists(self, uri: str) -> bool:
        fs, p = self._path(uri)
        return bool(fs.exists(p))

    def rename(self, src: str, dst: str) -> None:
        fs, p = self._path(src)
        if not fs.rename(p, self._jvm.org.apache.hadoop.fs.Path(dst)):
            raise ScoringError(f"could not rename {src} to {dst}")

    def delete(self, uri: str) -> None:
        fs, p = self._path(uri)
        fs.delete(p, True)


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _local(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def _sibling(uri: str, name: str) -> str:
    """A path next to ``uri`` (same folder, so a rename stays on one file system)."""
    head, _, _ = uri.rstrip("/").rpartition("/")
    return f"{head}/{name}" if head else name


def default_rejects_path(output: str) -> str:
    """``out.parquet`` -> ``out.rejects.parquet``, as the local job names it."""
    base = output.rstrip("/")
    stem = base[: -len(".parquet")] if base.endswith(".parquet") else base
    return stem + ".rejects.parquet"


def input_fingerprint(uri: str) -> str:
    """SHA-256 of a local input file, or of its part files' hashes for a local folder;
    remote inputs are not read twice just to hash them."""
    if not _is_local(uri):
        return f"not computed (remote input {uri})"
    path = _local(uri)
    if path.is_file():
        return file_fingerprint(path)
    h = hashlib.sha256()
    for part in sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))
    ):
        h.update(f"{part.relative_to(path)}:{file_fingerprint(part)}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------- schema
def _spark_type(col_type: Any) -> Any:
    """The Spark type of one MLflow signature column; ``Any`` (e.g. an all-null
    ``reject_reason`` in the input example) is text."""
    from pyspark.sql.types import StringType

    try:
        return col_type.to_spark()
    except AttributeError:
        return StringType()


def output_struct(signature: Any) -> Any:
    """Spark schema of the scored rows: ``input_row`` + the signature's output columns
    (``reject_reason`` always present, as text)."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    if signature is None or signature.outputs is None:
        raise ScoringError(
            "the model has no output signature; Spark needs the output columns up front "
            "(log the model with core.pyfunc.log_predictor)"
        )
    fields = [StructField(ROW_ID, LongType(), True)]
    for col in signature.outputs.inputs:
        if col.name == ROW_ID:
            continue
        kind = StringType() if col.name == REJECT_COLUMN else _spark_type(col.type)
        fields.append(StructField(col.name, kind, True))
    if REJECT_COLUMN not in {f.name for f in fields}:
        fields.append(StructField(REJECT_COLUMN, StringType(), True))
    return StructType(fields)


# ---------------------------------------------------------------------- row ids
def with_row_ids(df: Any) -> tuple[Any, int]:
    """(``df`` with ``input_row``, the row count). ``input_row``: the row's position in the input (file order, partition by partition).

    Spark has no row number that survives a shuffle, so positions come from
    ``monotonically_increasing_id`` (partition id << 33 + row in partition) and one small
    count per partition; one input file gives exactly the local job's numbering.
    """
    from pyspark.sql import functions as F

    df = df.withColumn("_keel_pid", F.spark_partition_id()).withColumn(
        "_keel_mid", F.monotonically_increasing_id()
    )
    counts = sorted(df.groupBy("_keel_pid").count().collect())
    offsets, start = [], 0
    for pid, n in counts:
        offsets += [F.lit(int(pid)), F.lit(start)]
        start += int(n)
    if not offsets:
        return df.withColumn(ROW_ID, F.lit(None).cast("long")).drop("_keel_pid", "_keel_mid"), 0
    offset = F.create_map(*offsets)[F.col("_keel_pid")]
    local_row = F.col("_keel_mid") - F.shiftleft(F.col("_keel_pid").cast("long"), 33)
    ids = df.withColumn(ROW_ID, (offset + local_row).cast("long"))
    return ids.drop("_keel_pid", "_keel_mid"), start


# ---------------------------------------------------------------------- executors
@functools.lru_cache(maxsize=4)
def _executor_model(local_dir: str) -> Any:
    """The pyfunc, loaded once per executor Python worker (workers are reused across tasks)."""
    import mlflow

    return mlflow.pyfunc.load_model(local_dir)


def _model_dir_on_executor(name: str) -> str:
    from pyspark import SparkFiles

    return SparkFiles.get(name)


def score_frame(
    model: Any, frame: pd.DataFrame, required: list[str], columns: list[str]
) -> pd.DataFrame:
    """Score one pandas frame (a group, a partition) as the local job scores a chunk.

    ``input_row`` is carried over when the predictor returns one row per input row (as the
    local job adds it); the result has exactly ``columns``, in order.
    """
    frame = frame.sort_values(ROW_ID, kind="stable").reset_index(drop=True)
    scored = model.predict(frame[required]).reset_index(drop=True)
    if ROW_ID not in scored:
        scored.insert(0, ROW_ID, frame[ROW_ID].to_numpy() if len(scored) == len(frame) else None)
    for col in columns:
        if col not in scored:
            scored[col] = None
    return scored[columns]


def _frame_scorer(
    model_file: str, required: list[str], columns: list[str]
) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def run(frame: pd.DataFrame) -> pd.DataFrame:
        model = _executor_model(_model_dir_on_executor(model_file))
        return score_frame(model, frame, required, columns)

    return run


def _partition_scorer(
    model_file: str, required: list[str], columns: list[str]
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    one = _frame_scorer(model_file, required, columns)

    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for frame in frames:
            yield one(frame)

    return run


# ---------------------------------------------------------------------- job
def _read(spark: Any, uri: str) -> Any:
    lower = uri.lower().rstrip("/")
    if lower.endswith((".csv", ".csv.gz", ".txt")):
        return spark.read.option("header", True).option("inferSchema", True).csv(uri)
    return spark.read.parquet(uri)


def _scored(
    spark: Any,
    df: Any,
    model_uri: str,
    mode: str,
    group_column: str | None,
    required: list[str],
    struct: Any,
    env_manager: str,
) -> Any:
    """The scored DataFrame (``struct``'s columns) by the chosen route."""
    import mlflow
    from pyspark.sql import functions as F

    columns = struct.fieldNames()
    if mode == "udf":
        outputs = struct[1:]  # everything but input_row, which Spark keeps beside the udf
        from pyspark.sql.types import StructType

        udf = mlflow.pyfunc.spark_udf(
            spark, model_uri, result_type=StructType(list(outputs)), env_manager=env_manager
        )
        scored = df.select(F.col(ROW_ID), udf(F.struct(*required)).alias("_keel_out"))
        return scored.select(ROW_ID, *[_null_fixed(f"_keel_out.{f.name}", f) for f in outputs])
    if env_manager != "local":
        raise ScoringError(
            f"mode {mode!r} loads the model inside Spark's Python workers and needs "
            f"env_manager='local' (got {env_manager!r}); install the model's requirements "
            "on the executors instead"
        )
    from mlflow.artifacts import download_artifacts

    local_dir = download_artifacts(artifact_uri=model_uri)
    spark.sparkContext.addFile(local_dir, recursive=True)
    name = Path(local_dir.rstrip("/")).name
    keep = [ROW_ID, *required]
    if mode == "grouped":
        return (
            df.select(*keep)
            .groupBy(group_column)
            .applyInPandas(_frame_scorer(name, required, columns), schema=struct)
        )
    return df.select(*keep).mapInPandas(_partition_scorer(name, required, columns), schema=struct)


def _null_fixed(column: str, field: Any) -> Any:
    """Undo spark_udf's text conversion of nulls in string fields of a struct result.

    MLflow casts a string field with ``astype(str)`` whenever the batch holds at least one
    non-null value, so ``None`` arrives as ``"None"`` (or ``"nan"``); ``reject_reason`` must
    stay null for scored rows. A predictor never emits those two words as real text.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    col = F.col(column)
    if isinstance(field.dataType, StringType):
        col = F.when(col.isin("None", "nan"), F.lit(None).cast("string")).otherwise(col)
    return col.alias(field.name)


def _write_atomic(fs: _HadoopFS, frame: Any, target: str, overwrite: bool) -> None:
    """Spark writes into a temp folder beside ``target``, renamed into place when complete."""
    token = uuid.uuid4().hex[:12]
    name = target.rstrip("/").rpartition("/")[2]
    tmp = _sibling(target, f".{name}.tmp-{token}")
    try:
        frame.write.parquet(tmp)
        if fs.exists(target):
            if not overwrite:
                raise ScoringError(f"{target} appeared while scoring; not overwriting it")
            old = _sibling(target, f".{name}.old-{token}")
            fs.rename(target, old)
            fs.rename(tmp, target)
            fs.delete(old)
        else:
            fs.rename(tmp, target)
    finally:
        if fs.exists(tmp):
            fs.delete(tmp)


def spark_score(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    rejects_path: str | Path | None = None,
    spark: Any = None,
    master: str | None = DEFAULT_MASTER,
    mode: str = "auto",
    env_manager: str = "local",
    overwrite: bool = False,
    log_to_mlflow: bool = True,
) -> ScoreReport:
    """Score ``input_path`` (Parquet file/folder or CSV; local path or any Hadoop URI) with the
    model at ``model_uri`` into the Parquet folder ``output_path`` and its rejects folder.

    ``mode``: ``auto`` picks ``grouped`` when the model declares a group column, else
    ``udf``; ``partitions`` for predictors whose output rows are not one per input row.
    ``spark``: an existing session (else one is made with ``master``).
    """
    import mlflow

    if mode not in MODES:
        raise ScoringError(f"mode must be one of {MODES}, got {mode!r}")
    inp, out = str(input_path), str(output_path)
    rej = str(rejects_path) if rejects_path else default_rejects_path(out)
    spark = spark if spark is not None else spark_session(master)
    fs = _HadoopFS(spark)
    if not fs.exists(inp):
        raise ScoringError(f"input {inp} does not exist")
    for target in (out, rej):
        if fs.exists(target) and not overwrite:
            raise ScoringError(f"output {target} exists; pass overwrite=True (--overwrite)")

    info = mlflow.models.get_model_info(model_uri)
    group_column = (info.metadata or {}).get("group_column")
    if mode == "auto":
        mode = "grouped" if group_column else "udf"
    if mode == "grouped" and not group_column:
        raise ScoringError(f"mode 'grouped' but {model_uri} declares no group_column")
    version = _resolve_version(model_uri)
    report = ScoreReport(model_uri, version, inp, input_fingerprint(inp), out, rej)

    df = _read(spark, inp)
    schema = info.signature.inputs if info.signature is not None else None
    required = list(schema.input_names()) if schema is not None else list(df.columns)
    report.ignored_columns = check_columns(required, list(df.columns), Path(inp))
    if group_column and group_column not in required:
        required.append(group_column)  # grouped by it, so the predictor sees it too
    struct = output_struct(info.signature)
    report.chunks = df.rdd.getNumPartitions()

    if _is_local(out):
        _local(out).parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(_local(out)) if _is_local(out) else contextlib.nullcontext():
        from pyspark import StorageLevel
        from pyspark.sql import functions as F

        with_ids, report.rows_in = with_row_ids(df)
        scored = _scored(
            spark, with_ids, model_uri, mode, group_column, required, struct, env_manager
        ).persist(StorageLevel.MEMORY_AND_DISK)  # two writes below, one scoring pass
        try:
            bad = F.col(REJECT_COLUMN).isNotNull()
            _write_atomic(fs, scored.filter(~bad).drop(REJECT_COLUMN), out, overwrite)
            _write_atomic(fs, scored.filter(bad), rej, overwrite)
            reasons = scored.filter(bad).groupBy(REJECT_COLUMN).count().collect()
            report.rows_out = scored.filter(~bad).count()
        finally:
            scored.unpersist()
    report.reject_reasons = {str(r[REJECT_COLUMN]): int(r["count"]) for r in reasons}
    report.rows_rejected = sum(report.reject_reasons.values())
    log.info("scored %s rows with Spark (%s mode): %s", report.rows_in, mode, report)
    if log_to_mlflow:
        _log_scoring_run(report)
    return report
