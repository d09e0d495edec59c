"""YAML round-trip for nested config dataclasses (apps' configs use this mixin)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T", bound="YamlConfig")


def _build(tp: Any, value: Any) -> Any:
    """Rebuild a dataclass field value from plain data, following the type hints."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _build(arg, value)
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(value) - names
        if unknown:
            raise ValueError(
                f"unknown keys for {tp.__name__}: {sorted(unknown)}; known: {sorted(names)}"
            )
        return tp(**{k: _build(hints[k], v) for k, v in value.items()})
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


class YamlConfig:
    """Mixin for dataclasses: ``to_dict``, ``from_dict``, ``to_yaml``, ``from_yaml``."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return _build(cls, dict(data))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def with_overrides(self: T, overrides: Mapping[str, Any]) -> T:
        """A copy with dotted-key overrides (``{"model.dropout": 0.3, "optim.lr": 3e-4}``),
        rebuilt through ``from_dict`` so nested dataclasses and their checks run again. A
        key that names no field raises ``KeyError`` naming the key and where it looked,
        rather than adding a field nothing reads (a misspelt override must not pass as a
        recipe that was tried)."""
        data = self.to_dict()  # type: ignore[attr-defined]
        for key, value in overrides.items():
            *parents, leaf = str(key).split(".")
            node = data
            for i, part in enumerate(parents):
                child = node.get(part) if isinstance(node, dict) else None
                if not isinstance(child, dict):
                    raise KeyError(
                        f"override {key!r}: {'.'.join(parents[: i + 1])!r} is not a config section"
                    )
                node = child
            if leaf not in node:
                where = ".".join(parents) or "the top level"
                raise KeyError(f"override {key!r}: no field {leaf!r} in {where}")
            node[leaf] = value
        return type(self).from_dict(data)  # type: ignore[attr-defined]

    @classmethod
    def from_yaml(cls: type[T], path: str | Path) -> T:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} not found")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{p}: expected a mapping at the top level")
        return cls.from_dict(data)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def load_candidates(path: str | Path) -> dict[str, Any]:
    """A model-selection grid file: ``candidates`` (name -> dotted-key overrides, in file
    order; ``{}`` is the base config itself) plus optional ``metric`` and ``folds``.

    ```yaml
    metric: pr_auc
    folds: 3
    candidates:
      shipped: {}
      dropout0.3: {model.dropout: 0.3, optim.weight_decay: 0.1}
    ```
    Raises ``ValueError`` naming the file and the bad entry.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"candidates file {p} not found")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict) or not isinstance(data.get("candidates"), dict):
        raise ValueError(f"{p}: expected a mapping with a 'candidates' mapping (name -> overrides)")
    unknown = set(data) - {"candidates", "metric", "folds"}
    if unknown:
        raise ValueError(f"{p}: unknown top-level key(s) {sorted(unknown)}")
    cands = data["candidates"]
    if not cands:
        raise ValueError(f"{p}: 'candidates' is empty")
    for name, over in cands.items():
        if over is None:
            cands[name] = {}
        elif not isinstance(over, dict):
            raise ValueError(
                f"{p}: candidate {name!r}: expected a mapping of overrides, got {over!r}"
            )
    folds = data.get("folds")
    if folds is not None and (not isinstance(folds, int) or isinstance(folds, bool) or folds < 1):
        raise ValueError(f"{p}: folds must be an integer >= 1, got {folds!r}")
    return {"candidates": cands, "metric": data.get("metric"), "folds": folds}
