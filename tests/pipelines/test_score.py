"""Batch scoring: chunks, rejects, resume, idempotence, locking, signature checks."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from core import tracking
from core.examples.synthetic import COLUMNS, make_frame
from pipelines.score import OutputLock, ScoringError, iter_chunks, score

MODEL = "models:/keel-synthetic@champion"


@pytest.fixture()
def scoring_input(tmp_path):
    frame = make_frame(450, 7)[COLUMNS]
    frame.loc[10, "x3"] = np.nan
    frame.loc[301, "c1"] = -1
    path = tmp_path / "in.parquet"
    frame.to_parquet(path, index=False)
    return frame, path


def test_score_chunks_rejects_and_matches_direct_predict(registered_store, scoring_input, tmp_path):
    _, uri, _ = registered_store
    tracking.configure(uri)
    frame, path = scoring_input
    rep = score(MODEL, path, tmp_path / "out.parquet", chunk_rows=100, progress=False)
    assert (rep.rows_in, rep.rows_out, rep.rows_rejected, rep.chunks) == (450, 448, 2, 5)
    assert sum(rep.reject_reasons.values()) == 2
    out = pd.read_parquet(tmp_path / "out.parquet")
    rejects = pd.read_parquet(tmp_path / "out.rejects.parquet")
    assert sorted(rejects["input_row"]) == [10, 301]
    assert set(out["input_row"]) | set(rejects["input_row"]) == set(range(450))  # nothing dropped
    import mlflow

    direct = mlflow.pyfunc.load_model(MODEL).predict(frame)["probability"].to_numpy()
    np.testing.assert_allclose(
        out["probability"].to_numpy(), np.delete(direct, [10, 301]), rtol=1e-5
    )
    # the scoring run is tracked
    runs = mlflow.search_runs(experiment_names=["keel-scoring"])
    assert (runs["metrics.rows_rejected"] == 2).any()


def test_resume_after_kill_is_exact_and_rerun_is_idempotent(
    registered_store, scoring_input, tmp_path
):
    _, uri, _ = registered_store
    tracking.configure(uri)
    _, path = scoring_input
    full = score(
        MODEL, path, tmp_path / "full.parquet", chunk_rows=100, progress=False, log_to_mlflow=False
    )
    partial = score(
        MODEL,
        path,
        tmp_path / "res.parquet",
        chunk_rows=100,
        progress=False,
        log_to_mlflow=False,
        stop_after_chunks=2,
    )
    assert not (tmp_path / "res.parquet").exists()  # no half-written output
    resumed = score(
        MODEL, path, tmp_path / "res.parquet", chunk_rows=100, progress=False, log_to_mlflow=False
    )
    assert partial.chunks == 2 and resumed.chunks_resumed == 2
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "full.parquet"), pd.read_parquet(tmp_path / "res.parquet")
    )
    again = score(
        MODEL, path, tmp_path / "res.parquet", chunk_rows=100, progress=False, log_to_mlflow=False
    )
    assert again.already_complete and again.rows_out == full.rows_out


def test_refusals(registered_store, scoring_input, tmp_path):
    _, uri, _ = registered_store
    tracking.configure(uri)
    frame, path = scoring_input
    bad = tmp_path / "bad.csv"
    frame.drop(columns=["x2"]).assign(extra=1).to_csv(bad, index=False)
    with pytest.raises(ScoringError, match=r"missing \['x2'\].*unexpected \['extra'\]"):
        score(MODEL, bad, tmp_path / "o.parquet", progress=False, log_to_mlflow=False)
    out = tmp_path / "locked.parquet"
    lock = out.with_name(out.name + ".lock")
    import socket

    lock.write_text(f"{socket.gethostname()}:{os.getpid()}")  # a live job holds it
    with pytest.raises(ScoringError, match="refusing to interleave"):
        score(MODEL, path, out, progress=False, log_to_mlflow=False)
    lock.write_text(f"{socket.gethostname()}:999999")  # a dead job: taken over
    rep = score(MODEL, path, out, progress=False, log_to_mlflow=False)
    assert rep.rows_out == 448 and not lock.exists()


def test_csv_input_and_group_chunking(tmp_path):
    frame = pd.DataFrame({"asset": np.repeat(["a", "b", "c", "d"], [3, 5, 2, 4]), "v": range(14)})
    p = tmp_path / "g.csv"
    frame.to_csv(p, index=False)
    chunks = list(iter_chunks(p, 4, group_column="asset"))
    assert sum(len(c) for c in chunks) == 14
    for c in chunks:  # no asset straddles two chunks
        assert all(
            frame[frame.asset == a].shape[0] == (c.asset == a).sum() for a in c.asset.unique()
        )
    shuffled = frame.sample(frac=1, random_state=0)
    shuffled.to_csv(p, index=False)
    with pytest.raises(ScoringError, match="not contiguous"):
        list(iter_chunks(p, 4, group_column="asset"))


def test_lock_is_exclusive(tmp_path):
    out = tmp_path / "x.parquet"
    with OutputLock(out):
        with pytest.raises(ScoringError):
            with OutputLock(out):
                pass
    with OutputLock(out):
        pass


def test_integer_ids_widen_to_the_signature_float_columns_only_when_exact(tmp_path) -> None:
    import pandas as pd
    import pytest
    from mlflow.types import ColSpec, Schema

    from pipelines.score import ScoringError, widen_integers

    schema = Schema([ColSpec("double", "card_id"), ColSpec("long", "n")])
    chunk = pd.DataFrame({"card_id": [1, 2, 2**53], "n": [1, 2, 3]})
    out = widen_integers(chunk, schema, tmp_path / "in.parquet")
    assert out["card_id"].dtype == "float64" and out["n"].dtype == "int64"
    assert out["card_id"].tolist() == [1.0, 2.0, float(2**53)]
    assert chunk["card_id"].dtype == "int64"  # the caller's frame is untouched
    with pytest.raises(ScoringError, match="card_id"):
        widen_integers(pd.DataFrame({"card_id": [2**53 + 1], "n": [0]}), schema, tmp_path)
