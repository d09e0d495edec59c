"""Schema mapping: which column of a transactions file plays which role.

Fraud datasets name their columns differently (``Time``/``Class`` in the ULB set,
``TX_DATETIME``/``TX_FRAUD`` in the handbook set); everything downstream (readers,
features, splits, metrics) asks a :class:`FraudSchema` instead of hard-coding names.
Shipped schemas live as YAML in ``apps/fraud/schemas/`` and load with :func:`load_schema`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from apps.fraud.errors import FraudConfigError
from core.configio import YamlConfig

#: Name of the parsed event-time column (``Datetime[us]``) that the readers add.
TS = "_ts"

TIME_KINDS = ("datetime", "offset")
TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DATA_ROOTS = ("shared", "project")

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """Folder of the real datasets: ``$KEEL_DATA_DIR``, else ``<project>/../shared/data``."""
    env = os.environ.get("KEEL_DATA_DIR")
    return Path(env) if env else PROJECT_ROOT.parent / "shared" / "data"


@dataclass
class FraudSchema(YamlConfig):
    """Roles of a transactions file's columns.

    ``time_kind``: ``datetime`` (a datetime/date column, or strings parsed with
    ``time_format``; ``None`` lets polars infer an ISO-like format) or ``offset``
    (numbers in ``time_unit`` since ``time_origin``; with no origin the times are only
    relative, so calendar features such as weekend flags are unavailable).
    ``never_use_columns`` are loaded (for analysis, e.g. ``TX_FRAUD_SCENARIO``) but a
    feature builder refuses them; ``drop_columns`` are not loaded at all.
    ``default_path`` is relative to ``data_root``: ``shared`` (the real-datasets folder,
    :func:`data_dir`) or ``project`` (the project root, for ``data_samples/``).
    """

    name: str
    time_column: str
    amount_column: str
    label_column: str
    card_column: str | None = None
    terminal_column: str | None = None
    id_column: str | None = None
    categorical_columns: tuple[str, ...] = ()
    numeric_columns: tuple[str, ...] = ()
    never_use_columns: tuple[str, ...] = ()
    drop_columns: tuple[str, ...] = ()
    time_kind: str = "datetime"
    time_format: str | None = None
    time_unit: str = "s"
    time_origin: str | None = None
    allow_negative_amount: bool = False
    default_path: str | None = None
    data_root: str = "shared"
    description: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("categorical_columns", "numeric_columns", "never_use_columns", "drop_columns"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise FraudConfigError(
                    f"schema {self.name!r}: {name} must be a list, got {value!r}"
                )
            setattr(self, name, tuple(value or ()))
        if self.time_kind not in TIME_KINDS:
            raise FraudConfigError(
                f"schema {self.name!r}: time_kind must be one of {TIME_KINDS}, got {self.time_kind!r}"
            )
        if self.time_unit not in TIME_UNITS:
            raise FraudConfigError(
                f"schema {self.name!r}: time_unit must be one of {sorted(TIME_UNITS)}, got {self.time_unit!r}"
            )
        if self.data_root not in DATA_ROOTS:
            raise FraudConfigError(
                f"schema {self.name!r}: data_root must be one of {DATA_ROOTS}, got {self.data_root!r}"
            )
        roles = self.role_columns()
        seen: dict[str, str] = {}
        for role, col in roles.items():
            if col in seen:
                raise FraudConfigError(
                    f"schema {self.name!r}: column {col!r} has two roles ({seen[col]}, {role})"
                )
            seen[col] = role
        features = self.categorical_columns + self.numeric_columns
        for col in features:
            if col in seen:
                raise FraudConfigError(
                    f"schema {self.name!r}: feature column {col!r} is already the {seen[col]} column"
                )
        dup = sorted({c for c in features if features.count(c) > 1})
        if dup:
            raise FraudConfigError(f"schema {self.name!r}: feature columns listed twice: {dup}")
        banned = sorted(set(features) & set(self.never_use_columns))
        if banned:
            raise FraudConfigError(
                f"schema {self.name!r}: {banned} are never_use_columns and cannot be features"
            )
        needed = set(roles.values()) | set(features) | set(self.never_use_columns)
        dropped = sorted(needed & set(self.drop_columns))
        if dropped:
            raise FraudConfigError(
                f"schema {self.name!r}: drop_columns {dropped} are used by the schema"
            )
        if TS in needed:
            raise FraudConfigError(f"schema {self.name!r}: column name {TS!r} is reserved")

    def role_columns(self) -> dict[str, str]:
        """Role name -> column, for the roles that are set."""
        roles = {
            "time": self.time_column,
            "amount": self.amount_column,
            "label": self.label_column,
            "card": self.card_column,
            "terminal": self.terminal_column,
            "id": self.id_column,
        }
        return {k: v for k, v in roles.items() if v is not None}

    @property
    def feature_source_columns(self) -> tuple[str, ...]:
        """Columns a model may read as given (categoricals then numerics)."""
        return self.categorical_columns + self.numeric_columns

    @property
    def has_calendar(self) -> bool:
        """True when times are real calendar times (weekday/weekend features make sense)."""
        return self.time_kind == "datetime" or self.time_origin is not None

    def resolve_path(self, path: str | Path | None = None) -> Path:
        """``path`` if given, else ``default_path`` under ``data_root``."""
        if path is not None:
            return Path(path)
        if self.default_path is None:
            raise FraudConfigError(f"schema {self.name!r} has no default_path; pass a path")
        root = data_dir() if self.data_root == "shared" else PROJECT_ROOT
        return root / self.default_path


def available_schemas() -> list[str]:
    """Names of the schemas shipped in ``apps/fraud/schemas/``."""
    folder = resources.files("apps.fraud").joinpath("schemas")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_schema(name_or_path: str | Path) -> FraudSchema:
    """A shipped schema by name (``ulb``, ``handbook``, ``synthetic``) or a YAML file path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(name_or_path)
        if not path.exists():
            raise FraudConfigError(f"schema file {path} not found")
        source = str(path)
        raw = path.read_text()
    else:
        res = resources.files("apps.fraud").joinpath("schemas", f"{text}.yaml")
        if not res.is_file():
            raise FraudConfigError(
                f"no shipped fraud schema named {text!r}; available: {available_schemas()}"
            )
        source = f"apps/fraud/schemas/{text}.yaml"
        raw = res.read_text()
    data = yaml.safe_load(raw) or {}
    if not isinstance(data, dict):
        raise FraudConfigError(f"{source}: expected a mapping at the top level")
    try:
        return FraudSchema.from_dict(data)
    except FraudConfigError as err:
        raise FraudConfigError(f"{source}: {err}") from None
    except (TypeError, ValueError) as err:
        raise FraudConfigError(f"{source}: {err}") from None
