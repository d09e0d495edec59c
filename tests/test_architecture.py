"""Architecture rules that keep the codebase honest: who may import whom."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPS = sorted(
    p.name for p in (ROOT / "apps").iterdir() if p.is_dir() and (p / "__init__.py").exists()
)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_apps_never_import_each_other():
    offenders = []
    for app in APPS:
        for path in (ROOT / "apps" / app).rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "apps" and len(parts) > 1 and parts[1] != app:
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_core_and_pipelines_do_not_import_concrete_apps():
    offenders = []
    for pkg in ("core", "pipelines"):
        for path in (ROOT / pkg).rglob("*.py"):
            for name in _imports(path):
                if name.startswith("apps."):
                    offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_importing_every_app_keeps_torchvision_out():
    """MONAI's detection networks pull torchvision, which breaks beside the CPU torch wheel."""
    modules = [
        f"apps.{a}.spec" if (ROOT / "apps" / a / "spec.py").exists() else f"apps.{a}" for a in APPS
    ]
    code = (
        "import sys, importlib\n"
        + "".join(f"importlib.import_module('{m}')\n" for m in modules)
        + "import pipelines.cli\nprint('torchvision' in sys.modules, 'monai.apps.detection.networks' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr
