"""Spark batch scoring gives the local job's rows exactly, for row-wise and grouped models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core import tracking
from core.examples.synthetic import COLUMNS, make_frame
from core.spec import AppSpec, EvalResult
from pipelines.score import ScoringError, score
from pipelines.spark_score import default_rejects_path, spark_score, spark_session

# a JVM, Python workers and a model load per worker: about a minute on a quiet core
pytestmark = pytest.mark.slow

MODEL = "models:/keel-synthetic@champion"
ROOT = Path(__file__).resolve().parents[2]


class RunningMeanPredictor:
    """A deliberately group- and order-dependent model: each row scores the running mean of
    ``x`` over its asset's rows so far. Splitting an asset, or reordering it, changes the
    scores, so equality with the local job proves whole, ordered groups."""

    input_columns = ["asset", "x"]
    scoring_metadata = {"group_column": "asset"}

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def save(self, path: Path) -> None:
        (Path(path) / "params.json").write_text(json.dumps({"scale": self.scale}))

    @classmethod
    def load(cls, path: Path) -> RunningMeanPredictor:
        return cls(**json.loads((Path(path) / "params.json").read_text()))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        x = pd.to_numeric(frame["x"], errors="coerce").reset_index(drop=True)
        asset = frame["asset"].reset_index(drop=True)
        ok = x.notna()
        running = x.where(ok).groupby(asset).transform(lambda s: s.expanding().mean())
        reasons = pd.Series([None] * len(x), dtype=object)
        reasons[~ok] = "x: missing"
        return pd.DataFrame(
            {
                "score": (running * self.scale).where(ok).to_numpy(np.float64),
                "reject_reason": reasons,
            }
        )


SPEC = AppSpec(
    name="running-mean",
    description="test-only grouped model",
    config_cls=dict,
    train=lambda cfg, run=None: None,
    evaluate=lambda predictor, cfg: EvalResult({}, "none"),
    predictor_cls=RunningMeanPredictor,
    primary_metric="none",
)


@pytest.fixture(scope="module")
def spark():
    with pytest.MonkeyPatch.context() as mp:
        # Spark's Python workers inherit this environment: one thread each, and the project
        # root importable (the grouped model's spec lives in this test module)
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        session = spark_session(
            "local[2]",
            conf={
                "spark.sql.shuffle.partitions": "3",
                "spark.default.parallelism": "2",
                "spark.ui.enabled": "false",
                "spark.driver.memory": "512m",
                "spark.sql.files.maxPartitionBytes": "12000",  # 3 partitions per file
                "spark.sql.files.openCostInBytes": "0",
            },
        )
        session.sparkContext.setLogLevel("ERROR")
        yield session
        session.stop()


def _sorted(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    return frame.sort_values("input_row").reset_index(drop=True)


def _assert_same_rows(local: Path, spark_dir: Path) -> None:
    a, b = _sorted(local), _sorted(spark_dir)
    assert list(b.columns) == list(a.columns)
    pd.testing.assert_frame_equal(a, b, check_dtype=False, rtol=1e-6, atol=1e-6)


def test_spark_udf_scoring_equals_local_job_row_for_row(registered_store, spark, tmp_path):
    _, uri, _ = registered_store
    tracking.configure(uri)
    frame = make_frame(450, 11)[COLUMNS]
    frame.loc[10, "x3"] = np.nan
    frame.loc[301, "c1"] = -1
    inp = tmp_path / "in.parquet"
    frame.to_parquet(inp, index=False, row_group_size=150)

    local = score(MODEL, inp, tmp_path / "local.parquet", chunk_rows=100, progress=False)
    out = tmp_path / "spark.parquet"
    rep = spark_score(MODEL, inp, out, spark=spark)
    assert spark.read.parquet(str(inp)).rdd.getNumPartitions() > 1  # ids cross partitions
    assert (rep.rows_in, rep.rows_out, rep.rows_rejected) == (450, 448, 2)
    assert rep.reject_reasons == local.reject_reasons
    assert rep.input_fingerprint == local.input_fingerprint
    _assert_same_rows(tmp_path / "local.parquet", out)
    _assert_same_rows(tmp_path / "local.rejects.parquet", Path(default_rejects_path(str(out))))
    assert sorted(pd.read_parquet(out)["input_row"]) == sorted(set(range(450)) - {10, 301})
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.endswith(".lock")]

    import mlflow

    runs = mlflow.search_runs(experiment_names=["keel-scoring"])
    mine = runs[runs["params.output_path"] == str(out)]
    assert len(mine) == 1 and mine["metrics.rows_rejected"].iloc[0] == 2

    # `keel score --engine spark` reaches this job (the local engine has no such refusal)
    from pipelines.cli import main

    argv = ["--tracking-uri", uri, "score", "--model", MODEL, "--input", str(inp)]
    with pytest.raises(ScoringError, match="exists; pass overwrite"):
        main([*argv, "--output", str(out), "--engine", "spark", "--spark-master", "local[2]"])


def test_grouped_model_scores_whole_ordered_groups_like_local_job(
    registered_store, spark, tmp_path
):
    import mlflow

    from core.pyfunc import log_predictor

    _, uri, _ = registered_store
    tracking.configure(uri)
    rng = np.random.default_rng(3)
    sizes = rng.integers(5, 40, size=12)
    frame = pd.DataFrame(
        {
            "asset": np.repeat([f"a{i:02d}" for i in range(len(sizes))], sizes),
            "x": rng.normal(size=int(sizes.sum())),
        }
    )
    frame.loc[[4, 50, 51], "x"] = np.nan
    inp = tmp_path / "grouped.parquet"
    frame.to_parquet(inp, index=False, row_group_size=40)

    with mlflow.start_run(experiment_id=tracking.get_or_create_experiment("keel-test-grouped")):
        info = log_predictor(
            RunningMeanPredictor(scale=2.0),
            "tests.pipelines.test_spark_score",
            input_example=frame.dropna().head(8),
            registered_model_name="keel-test-grouped",
        )
    model_uri = f"models:/keel-test-grouped/{info.registered_model_version}"
    assert mlflow.models.get_model_info(model_uri).metadata["group_column"] == "asset"

    score(model_uri, inp, tmp_path / "local.parquet", chunk_rows=50, progress=False)
    out = tmp_path / "spark.parquet"
    (out).mkdir()  # an existing output is replaced only on request
    rep = spark_score(model_uri, inp, out, spark=spark, overwrite=True, log_to_mlflow=False)
    assert (rep.rows_in, rep.rows_out, rep.rows_rejected) == (len(frame), len(frame) - 3, 3)
    _assert_same_rows(tmp_path / "local.parquet", out)
    _assert_same_rows(tmp_path / "local.rejects.parquet", Path(default_rejects_path(str(out))))
    # and both equal scoring the whole file at once (groups whole and in input order)
    direct = RunningMeanPredictor(scale=2.0).predict(frame)
    got = _sorted(out)
    np.testing.assert_allclose(
        got["score"], direct["score"].dropna().to_numpy(), rtol=1e-9, atol=1e-12
    )
