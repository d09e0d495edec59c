"""Batch scoring of any registered Keel model through its pyfunc interface.

Guarantees, because scoring jobs get killed, rerun and pointed at the same folder:

* streaming: the input is read in chunks (Parquet row groups or CSV blocks), never whole;
* atomic: chunks land as part files (temp file + rename) and the final output is assembled
  into a temp file and renamed, so a reader never sees a half-written output;
* resumable and idempotent: a manifest pins the model version, the input fingerprint and
  the chunking; a rerun skips finished chunks, and a rerun after completion does nothing;
* exclusive: a lock file makes a second job on the same output refuse instead of interleave;
* nothing dropped silently: rows the model rejects go to a rejects file with the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

REJECT_COLUMN = "reject_reason"


class ScoringError(RuntimeError):
    """A scoring job that cannot proceed, with the reason and what to do."""


@dataclass
class ScoreReport:
    model_uri: str
    model_version: str | None
    input_path: str
    input_fingerprint: str
    output_path: str
    rejects_path: str
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    chunks: int = 0
    chunks_resumed: int = 0
    already_complete: bool = False
    ignored_columns: list[str] = field(default_factory=list)


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def input_columns(path: Path) -> list[str]:
    if path.suffix == ".parquet":
        return list(pq.ParquetFile(path).schema_arrow.names)
    with pacsv.open_csv(path) as reader:
        return list(reader.schema.names)


def _arrow_batches(path: Path, batch_rows: int) -> Iterator[pa.RecordBatch]:
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)
    elif path.suffix in {".csv", ".txt"} or path.name.endswith(".csv.gz"):
        read_opts = pacsv.ReadOptions(block_size=1 << 24)
        with pacsv.open_csv(path, read_options=read_opts) as reader:
            yield from reader
    else:
        raise ScoringError(f"{path}: unsupported input format (expected .parquet or .csv)")


def iter_chunks(
    path: Path, chunk_rows: int, group_column: str | None = None
) -> Iterator[pd.DataFrame]:
    """Fixed-size chunks (deterministic boundaries, so a resumed job cuts the same chunks).

    With ``group_column`` a group never straddles two chunks: the trailing group is carried
    into the next chunk. Groups must be contiguous in the input.
    """
    buffer: list[pd.DataFrame] = []
    buffered = 0
    seen_groups: set[Any] = set()
    for batch in _arrow_batches(path, chunk_rows):
        frame = batch.to_pandas()
        buffer.append(frame)
        buffered += len(frame)
        while buffered >= chunk_rows:
            whole = pd.concat(buffer, ignore_index=True)
            head, tail = whole.iloc[:chunk_rows], whole.iloc[chunk_rows:]
            if group_column is not None:
                last = head[group_column].iloc[-1]
                carry = head[group_column] == last
                if carry.all():  # one group larger than a chunk: extend the chunk to hold it
                    more = tail[group_column] == last
                    stop = int(more.values.argmin()) if not more.all() else len(tail)
                    if more.all():
                        break  # need more input to find the group's end
                    head = pd.concat([head, tail.iloc[:stop]])
                    tail = tail.iloc[stop:]
                else:
                    tail = pd.concat([head[carry], tail])
                    head = head[~carry]
                _check_contiguous(head, group_column, seen_groups, path)
            yield head.reset_index(drop=True)
            buffer, buffered = [tail], len(tail)
    if buffered:
        rest = pd.concat(buffer, ignore_index=True)
        if group_column is not None:
            _check_contiguous(rest, group_column, seen_groups, path)
        yield rest


def _check_contiguous(chunk: pd.DataFrame, column: str, seen: set[Any], path: Path) -> None:
    groups = set(chunk[column].unique())
    again = groups & seen
    if again:
        raise ScoringError(
            f"{path}: rows of {column}={sorted(again)[:5]} are not contiguous; sort the input by {column!r} first"
        )
    seen |= groups


def _atomic_write_parquet(frame: pd.DataFrame, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputLock:
    """An exclusive lock file beside the output; a stale lock (dead pid, same host) is taken over."""

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".lock")

    def __enter__(self) -> OutputLock:
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, me.encode())
                os.close(fd)
                return self
            except FileExistsError:
                owner = self.path.read_text().strip()
                host, _, pid = owner.partition(":")
                if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                    log.warning("taking over stale lock %s from dead job %s", self.path, owner)
                    self.path.unlink(missing_ok=True)
                    continue
                raise ScoringError(
                    f"another scoring job ({owner}) is writing {self.path.with_suffix('')}; "
                    f"refusing to interleave (remove {self.path} if that job is gone)"
                ) from None
        raise ScoringError(f"could not take lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _resolve_version(model_uri: str) -> str | None:
    import mlflow

    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/") :]
    client = mlflow.MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return str(client.get_model_version_by_alias(name, alias).version)
    name, _, version = ref.partition("/")
    return version or None


def check_columns(required: list[str], present: list[str], path: Path) -> list[str]:
    """Refuse an input missing any signature column; return the ignored extra columns."""
    missing = [c for c in required if c not in present]
    extra = [c for c in present if c not in required]
    if missing:
        raise ScoringError(
            f"{path}: columns do not match the model signature; missing {missing}"
            + (f"; unexpected {extra}" if extra else "")
            + f"; expected {required}"
        )
    return extra


def widen_integers(chunk: pd.DataFrame, schema: Any, path: Path) -> pd.DataFrame:
    """Cast integer columns the signature declares as float/double, when exact.

    MLflow's schema enforcement refuses int64 -> float64 ("can not safely convert"), yet ids
    and counts often arrive as integers in a file while the model was logged from a frame
    holding them as floats. Integers up to 2**53 convert exactly, so those are cast; a
    larger value would change, and the column is refused with its name and the value.
    """
    if schema is None or not hasattr(schema, "inputs"):
        return chunk
    out = chunk
    for spec in schema.inputs:
        name, kind = getattr(spec, "name", None), str(getattr(spec, "type", ""))
        if name not in chunk or not pd.api.types.is_integer_dtype(chunk[name].dtype):
            continue
        if "double" not in kind and "float" not in kind:
            continue
        col = chunk[name]
        if len(col) and int(col.abs().max()) > 2**53:
            raise ScoringError(
                f"{path}: column {name!r} holds integer {int(col.abs().max())}, beyond 2**53, "
                f"which the model's float64 input cannot represent exactly"
            )
        if out is chunk:
            out = chunk.copy()
        out[name] = col.astype("float64")
    return out


def score(
    model_uri: str,
    input_path: str | Path,
    output_path: str | Path,
    *,
    rejects_path: str | Path | None = None,
    chunk_rows: int = 50_000,
    progress: bool = True,
    log_to_mlflow: bool = True,
    stop_after_chunks: int | None = None,
) -> ScoreReport:
    """Score ``input_path`` with the model at ``model_uri`` into ``output_path`` (Parquet).

    ``stop_after_chunks`` ends the job early on purpose (used to test resumption).
    """
    import mlflow
    from tqdm.auto import tqdm

    inp, out = Path(input_path), Path(output_path)
    if not inp.exists():
        raise ScoringError(f"input {inp} does not exist")
    out.parent.mkdir(parents=True, exist_ok=True)
    rej = Path(rejects_path) if rejects_path else out.with_name(out.stem + ".rejects.parquet")
    version = _resolve_version(model_uri)
    fingerprint = file_fingerprint(inp)
    manifest = {
        "model_uri": model_uri,
        "model_version": version,
        "input_fingerprint": fingerprint,
        "chunk_rows": chunk_rows,
    }
    report = ScoreReport(model_uri, version, str(inp), fingerprint, str(out), str(rej))
    done_marker = out.with_name(out.name + ".keel.json")

    with OutputLock(out):
        if out.exists() and done_marker.exists():
            previous = json.loads(done_marker.read_text())
            if previous.get("manifest") == manifest:
                report_dict = previous["report"]
                report_dict["already_complete"] = True
                return ScoreReport(**report_dict)
        model = mlflow.pyfunc.load_model(model_uri)
        schema = model.metadata.get_input_schema()
        required = schema.input_names() if schema is not None else input_columns(inp)
        report.ignored_columns = check_columns(list(required), input_columns(inp), inp)
        meta = model.metadata.metadata or {}
        group_column = meta.get("group_column")

        parts = out.with_name(f".{out.name}.parts")
        parts.mkdir(exist_ok=True)
        manifest_path = parts / "manifest.json"
        if manifest_path.exists():
            if json.loads(manifest_path.read_text()) != manifest:
                raise ScoringError(
                    f"{parts} holds a partial job for a different model or input; "
                    f"delete it to start over"
                )
        else:
            manifest_path.write_text(json.dumps(manifest))

        total = pq.ParquetFile(inp).metadata.num_rows if inp.suffix == ".parquet" else None
        bar = tqdm(total=total, unit="rows", desc=f"scoring {inp.name}", disable=not progress)
        row_offset = 0
        for i, chunk in enumerate(iter_chunks(inp, chunk_rows, group_column)):
            if stop_after_chunks is not None and i >= stop_after_chunks:
                bar.close()
                return report
            part, part_rej = parts / f"part-{i:06d}.parquet", parts / f"rejects-{i:06d}.parquet"
            report.chunks += 1
            report.rows_in += len(chunk)
            if part.exists():
                report.chunks_resumed += 1
            else:
                scored = model.predict(widen_integers(chunk[list(required)], schema, inp))
                if len(scored) == len(chunk):
                    scored.insert(0, "input_row", range(row_offset, row_offset + len(chunk)))
                bad = (
                    scored[REJECT_COLUMN].notna()
                    if REJECT_COLUMN in scored
                    else pd.Series(False, index=scored.index)
                )
                _atomic_write_parquet(scored[bad].reset_index(drop=True), part_rej)
                _atomic_write_parquet(
                    scored[~bad]
                    .drop(columns=[REJECT_COLUMN], errors="ignore")
                    .reset_index(drop=True),
                    part,
                )
            row_offset += len(chunk)
            bar.update(len(chunk))
        bar.close()

        outputs = sorted(parts.glob("part-*.parquet"))
        rejects = sorted(parts.glob("rejects-*.parquet"))
        good = (
            pd.concat([pd.read_parquet(p) for p in outputs], ignore_index=True)
            if outputs
            else pd.DataFrame()
        )
        bad = (
            pd.concat([pd.read_parquet(p) for p in rejects], ignore_index=True)
            if rejects
            else pd.DataFrame()
        )
        _atomic_write_parquet(good, out)
        _atomic_write_parquet(bad, rej)
        report.rows_out = len(good)
        report.rows_rejected = len(bad)
        if len(bad) and REJECT_COLUMN in bad:
            report.reject_reasons = {
                str(k): int(v) for k, v in bad[REJECT_COLUMN].value_counts().items()
            }
        done_marker.write_text(
            json.dumps({"manifest": manifest, "report": asdict(report)}, indent=1)
        )
        for p in [*outputs, *rejects, manifest_path]:
            p.unlink()
        parts.rmdir()

    if log_to_mlflow:
        _log_scoring_run(report)
    return report


def _log_scoring_run(report: ScoreReport) -> None:
    import mlflow

    from core import tracking

    exp_id = tracking.get_or_create_experiment("keel-scoring")
    with mlflow.start_run(experiment_id=exp_id, run_name=f"score-{Path(report.input_path).name}"):
        mlflow.log_params(
            {
                "model_uri": report.model_uri,
                "model_version": report.model_version,
                "input_path": report.input_path,
                "input_fingerprint": report.input_fingerprint,
                "output_path": report.output_path,
            }
        )
        mlflow.log_metrics(
            {
                "rows_in": report.rows_in,
                "rows_scored": report.rows_out,
                "rows_rejected": report.rows_rejected,
                "chunks": report.chunks,
                "chunks_resumed": report.chunks_resumed,
            }
        )
        mlflow.log_dict(report.reject_reasons, "reject_reasons.json")
