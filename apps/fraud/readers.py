"""Read transactions (CSV or Parquet) through a :class:`FraudSchema`, validated up front.

Reading is lazy (``pl.scan_csv`` / ``pl.scan_parquet``): validation is one aggregate pass
over only the columns the schema names, and the first bad rows are fetched only when a
check fails, so a bad file fails fast with a message naming the file, the column, the
rule and the first offending rows. Large files are collected with polars' streaming
engine. CSV files are read as text and each mapped column is parsed here, so a bad value
on row 10,000,000 is reported as such instead of tripping polars' type inference.

Row numbers in messages are 0-based data rows in file order (a CSV's header is not a row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from apps.fraud.errors import FraudDataError
from apps.fraud.schema import TIME_UNITS, TS, FraudSchema, load_schema

ROW = "_row"
STREAMING_MIN_BYTES = 256 * 2**20  # above this size the streaming engine collects


@dataclass(frozen=True)
class _Check:
    """One validation rule: rows where ``bad`` is true break it."""

    column: str
    role: str
    problem: str  # what is wrong, e.g. "not a number"
    bad: pl.Expr


def _raw_scan(path: Path) -> pl.LazyFrame:
    if not path.exists():
        raise FraudDataError(f"{path}: transactions file not found")
    name = path.name.lower()
    if name.endswith((".parquet", ".pq")):
        return pl.scan_parquet(path)
    if name.endswith(".csv"):
        return pl.scan_csv(path, infer_schema=False)
    if name.endswith(".tsv"):
        return pl.scan_csv(path, infer_schema=False, separator="\t")
    raise FraudDataError(f"{path}: unsupported file type (expected .csv, .tsv, .parquet or .pq)")


def file_columns(path: str | Path) -> list[str]:
    """The column names of a transactions file, read from its header only."""
    return _raw_scan(Path(path)).collect_schema().names()


def _is_number(dtype: pl.DataType) -> bool:
    return dtype.is_numeric()


def _as_float(col: str, dtype: pl.DataType) -> pl.Expr | None:
    """Float64 view of a column, or None when its dtype cannot hold numbers."""
    if dtype == pl.String:
        return pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    if _is_number(dtype) or dtype == pl.Boolean:
        return pl.col(col).cast(pl.Float64)
    return None


def _time_expr(schema: FraudSchema, dtype: pl.DataType) -> pl.Expr | None:
    """The event time as ``Datetime[us]`` (null where unparseable), or None if mistyped."""
    col = schema.time_column
    if schema.time_kind == "offset":
        v = _as_float(col, dtype) if dtype != pl.Boolean else None
        if v is None:
            return None
        origin_us = 0
        if schema.time_origin is not None:
            origin = datetime.fromisoformat(schema.time_origin)
            origin_us = int((origin - datetime(1970, 1, 1)).total_seconds() * 1e6)
        scale = TIME_UNITS[schema.time_unit] * 1e6
        us = (v * scale).round().cast(pl.Int64) + origin_us
        return pl.when(v.is_finite()).then(us).otherwise(None).cast(pl.Datetime("us"))
    if isinstance(dtype, pl.Datetime):
        expr = pl.col(col)
        if dtype.time_zone is not None:
            expr = expr.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return expr.dt.cast_time_unit("us")
    if dtype == pl.Date:
        return pl.col(col).cast(pl.Datetime("us"))
    if dtype == pl.String:
        return (
            pl.col(col)
            .str.strip_chars()
            .str.to_datetime(format=schema.time_format, strict=False, time_unit="us")
        )
    return None


def _wanted_columns(
    schema: FraudSchema,
    file_cols: list[str],
    columns: Sequence[str] | None,
    require_label: bool,
    path: Path,
) -> tuple[list[str], dict[str, str]]:
    """(columns to load in file order, role of each mapped column); missing ones raise."""
    roles = {col: role for role, col in schema.role_columns().items()}
    if not require_label and schema.label_column not in file_cols:
        roles.pop(schema.label_column)
    for col in schema.categorical_columns:
        roles.setdefault(col, "categorical")
    for col in schema.numeric_columns:
        roles.setdefault(col, "numeric")
    if columns is None:
        keep = [c for c in file_cols if c not in schema.drop_columns]
        required = list(roles)
    else:
        required = [c for c, r in roles.items() if r not in ("categorical", "numeric")]
        required += [c for c in columns if c not in required]
        keep = [c for c in file_cols if c in required]
    missing = [c for c in required if c not in file_cols]
    if missing:
        named = ", ".join(f"{c!r} ({roles.get(c, 'requested')})" for c in missing)
        raise FraudDataError(
            f"{path}: column {named} required by schema {schema.name!r} not found; "
            f"the file has columns {file_cols}"
        )
    return keep, {c: r for c, r in roles.items() if c in keep}


def _plan(
    path: Path,
    schema: FraudSchema,
    columns: Sequence[str] | None,
    require_label: bool,
) -> tuple[pl.LazyFrame, list[pl.Expr], list[_Check]]:
    """Raw scan, typed column expressions and validation checks for one file."""
    raw = _raw_scan(path)
    try:
        file_schema = raw.collect_schema()
    except pl.exceptions.PolarsError as err:
        raise FraudDataError(f"{path}: cannot read the file header: {err}") from None
    keep, roles = _wanted_columns(schema, file_schema.names(), columns, require_label, path)

    typed: list[pl.Expr] = []
    checks: list[_Check] = []

    def mistyped(col: str, role: str, expected: str) -> None:
        dtype = file_schema[col]
        checks.append(
            _Check(col, role, f"column has dtype {dtype}, expected {expected}", pl.lit(True))
        )

    for col in keep:
        role = roles.get(col, "other")
        dtype = file_schema[col]
        c = pl.col(col)
        if role == "time":
            ts = _time_expr(schema, dtype)
            if ts is None:
                kind = "numbers" if schema.time_kind == "offset" else "datetimes or strings"
                mistyped(col, role, f"{kind} (time_kind: {schema.time_kind})")
                typed.append(c)
                continue
            what = "number" if schema.time_kind == "offset" else "time"
            checks.append(_Check(col, role, "missing time", c.is_null()))
            checks.append(_Check(col, role, f"unparseable {what}", c.is_not_null() & ts.is_null()))
            typed += [c, ts.alias(TS)]
        elif role in ("amount", "numeric"):
            v = _as_float(col, dtype)
            if v is None or dtype == pl.Boolean:
                mistyped(col, role, "a number")
                typed.append(c)
                continue
            checks.append(_Check(col, role, "not a number", c.is_not_null() & v.is_null()))
            if role == "amount":
                checks.append(_Check(col, role, "missing amount", c.is_null()))
                checks.append(
                    _Check(col, role, "NaN or infinite amount", v.is_not_null() & ~v.is_finite())
                )
                if not schema.allow_negative_amount:
                    checks.append(_Check(col, role, "negative amount", v < 0))
            typed.append(v.alias(col))
        elif role == "label":
            v = _as_float(col, dtype)
            if v is None:
                mistyped(col, role, "0/1 labels")
                typed.append(c)
                continue
            checks.append(_Check(col, role, "missing label", c.is_null()))
            checks.append(
                _Check(
                    col,
                    role,
                    "label is not 0 or 1",
                    c.is_not_null() & (v.is_null() | ~v.is_in([0.0, 1.0])),
                )
            )
            typed.append(v.cast(pl.Int8).alias(col))
        elif role in ("card", "terminal"):
            if dtype.is_nested():
                mistyped(col, role, "an id (integer or string)")
            checks.append(_Check(col, role, f"missing {role} id", c.is_null()))
            typed.append(c)
        elif role == "categorical":
            if dtype.is_nested():
                mistyped(col, role, "a scalar category")
                typed.append(c)
            else:
                typed.append(c.cast(pl.String))
        else:
            typed.append(c)
    return raw, typed, checks


def _engine(path: Path, engine: str) -> str:
    if engine != "auto":
        return engine
    return "streaming" if path.stat().st_size >= STREAMING_MIN_BYTES else "auto"


def _fmt(value: object) -> str:
    return "null" if value is None else repr(value)


def _validate(
    path: Path,
    schema: FraudSchema,
    raw: pl.LazyFrame,
    checks: list[_Check],
    engine: str,
    max_examples: int,
) -> None:
    if not checks:
        return
    indexed = raw.with_row_index(ROW)
    counts = (
        indexed.select([chk.bad.sum().alias(str(i)) for i, chk in enumerate(checks)])
        .collect(engine=engine)
        .row(0)
    )
    problems = []
    for chk, n in zip(checks, counts, strict=True):
        if not n:
            continue
        rows = (
            indexed.filter(chk.bad)
            .select(ROW, pl.col(chk.column))
            .head(max_examples)
            .collect(engine=engine)
        )
        shown = ", ".join(f"row {r}: {_fmt(v)}" for r, v in rows.iter_rows())
        problems.append(
            f"  - column {chk.column!r} ({chk.role}): {chk.problem} in {n} row(s); first: {shown}"
        )
    if problems:
        raise FraudDataError(
            f"{path}: {len(problems)} problem(s) with schema {schema.name!r} "
            "(rows are 0-based data rows in file order):\n" + "\n".join(problems)
        )


def _as_schema(schema: FraudSchema | str | Path) -> FraudSchema:
    return schema if isinstance(schema, FraudSchema) else load_schema(schema)


def scan_transactions(
    path: str | Path,
    schema: FraudSchema | str,
    *,
    columns: Sequence[str] | None = None,
    require_label: bool = True,
) -> pl.LazyFrame:
    """Lazy typed view of a file, NOT validated (use :func:`load_transactions` for that).

    Mapped columns are cast (amount/numerics Float64, label Int8, categoricals String),
    ``_ts`` (``Datetime[us]``) is added, and rows are sorted by time (ties keep file order).
    ``columns`` restricts the load to the role columns plus these; ``None`` loads every
    column except the schema's ``drop_columns``.
    """
    schema = _as_schema(schema)
    raw, typed, _ = _plan(Path(path), schema, columns, require_label)
    return raw.select(typed).sort(TS, maintain_order=True)


def validate_transactions(
    path: str | Path,
    schema: FraudSchema | str,
    *,
    columns: Sequence[str] | None = None,
    require_label: bool = True,
    max_examples: int = 5,
    engine: str = "auto",
) -> None:
    """Raise :class:`FraudDataError` listing every broken rule with its first bad rows.

    Rules: every mapped column exists; time parses (no nulls); amount is a finite number
    (and >= 0 unless ``allow_negative_amount``); the label is 0/1 with no nulls; card and
    terminal ids are not null; numeric feature columns hold numbers (nulls allowed).
    """
    schema = _as_schema(schema)
    p = Path(path)
    raw, _, checks = _plan(p, schema, columns, require_label)
    _validate(p, schema, raw, checks, _engine(p, engine), max_examples)


def load_transactions(
    path: str | Path,
    schema: FraudSchema | str,
    *,
    columns: Sequence[str] | None = None,
    require_label: bool = True,
    validate: bool = True,
    engine: str = "auto",
) -> pl.DataFrame:
    """Validate (see :func:`validate_transactions`) then collect the typed, time-sorted frame.

    ``engine``: ``auto`` uses polars' streaming engine for files >= 256 MiB; or pass
    ``streaming`` / ``in-memory`` explicitly.
    """
    schema = _as_schema(schema)
    p = Path(path)
    raw, typed, checks = _plan(p, schema, columns, require_label)
    eng = _engine(p, engine)
    if validate:
        _validate(p, schema, raw, checks, eng, max_examples=5)
    return raw.select(typed).sort(TS, maintain_order=True).collect(engine=eng)


def load_dataset(
    name_or_schema: FraudSchema | str,
    path: str | Path | None = None,
    **kwargs: object,
) -> tuple[pl.DataFrame, FraudSchema]:
    """Load a named dataset (``ulb``, ``handbook``, ``synthetic``) from its default path."""
    schema = _as_schema(name_or_schema)
    return load_transactions(schema.resolve_path(path), schema, **kwargs), schema  # type: ignore[arg-type]
