"""Registry lifecycle on MLflow model aliases (no stages).

A model version becomes ``challenger`` when registered; it is promoted to ``champion``
only if its primary metric beats the champion's on the same evaluation data by a
configured margin and no guard metric regresses past its tolerance. Every promotion
records the previous champion on the new version, so ``rollback`` is one step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_TAG = "keel.previous_champion"


def model_name(app: str) -> str:
    return f"keel-{app}"


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def compare(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    *,
    primary: str,
    primary_mode: str = "max",
    margin: float = 0.0,
    guards: dict[str, tuple[str, float]] | None = None,
) -> Decision:
    """Should the challenger replace the champion? Both dicts were measured on the same data."""
    if primary not in challenger:
        return Decision(False, [f"challenger lacks primary metric {primary!r}"])
    if champion is None:
        return Decision(True, ["no champion yet"])
    sign = 1.0 if primary_mode == "max" else -1.0
    gain = sign * (challenger[primary] - champion[primary])
    reasons = [
        f"{primary}: challenger {challenger[primary]:.4f} vs champion {champion[primary]:.4f} "
        f"(gain {gain:+.4f}, margin {margin})"
    ]
    ok = gain > margin
    for name, (mode, tolerance) in (guards or {}).items():
        if name not in challenger or name not in champion:
            continue
        s = 1.0 if mode == "max" else -1.0
        change = s * (challenger[name] - champion[name])
        if change < -tolerance:
            ok = False
            reasons.append(
                f"guard {name} regressed: {challenger[name]:.4f} vs {champion[name]:.4f} (tolerance {tolerance})"
            )
    return Decision(ok, reasons)


def alias_version(name: str, alias: str) -> str | None:
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(name: str, version: str | int) -> None:
    """Make ``version`` the champion, remembering the previous one for rollback."""
    client = mlflow.MlflowClient()
    previous = alias_version(name, CHAMPION)
    if previous is not None and str(previous) != str(version):
        client.set_model_version_tag(name, str(version), PREVIOUS_TAG, str(previous))
    client.set_registered_model_alias(name, CHAMPION, str(version))


def rollback(name: str) -> str:
    """Point ``champion`` back at the version it replaced; returns that version."""
    client = mlflow.MlflowClient()
    current = alias_version(name, CHAMPION)
    if current is None:
        raise ValueError(f"model {name!r} has no champion to roll back")
    mv = client.get_model_version(name, current)
    previous = mv.tags.get(PREVIOUS_TAG)
    if not previous:
        raise ValueError(
            f"{name} v{current} has no recorded previous champion; nothing to roll back to"
        )
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_model_version_tag(name, current, "keel.rolled_back", "true")
    return previous


def list_models() -> list[dict[str, Any]]:
    client = mlflow.MlflowClient()
    rows = []
    for rm in client.search_registered_models():
        rows.append(
            {
                "name": rm.name,
                "aliases": {a: v for a, v in (rm.aliases or {}).items()},
                "latest_version": max(
                    (int(v.version) for v in client.search_model_versions(f"name='{rm.name}'")),
                    default=None,
                ),
            }
        )
    return rows


def show(name: str) -> list[dict[str, Any]]:
    client = mlflow.MlflowClient()
    aliases = client.get_registered_model(name).aliases or {}
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for mv in sorted(client.search_model_versions(f"name='{name}'"), key=lambda m: int(m.version)):
        run = client.get_run(mv.run_id) if mv.run_id else None
        rows.append(
            {
                "version": str(mv.version),
                "aliases": by_version.get(str(mv.version), []),
                "run_id": mv.run_id,
                "metrics": dict(run.data.metrics) if run else {},
                "tags": dict(mv.tags),
            }
        )
    return rows
