"""Safety of scoring (issue #7): no pickles, no patient identity out, no path escapes.

(a) a registered model is plain files: no pickle anywhere in its artifacts, MLflow loads it
    as models-from-code, and every ``torch.load``/``np.load`` in the code base refuses pickles;
(b) DICOM patient name/ID never reach the scoring outputs, the SRs or any MLflow run, store
    or artifact (unless ``include_patient_identity=True`` is asked for, the positive control);
(c) a SeriesInstanceUID crafted to climb out of the SR folder writes inside it.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from core import tracking

ROOT = Path(__file__).resolve().parents[2]
PATIENT_NAME = "Zzpiimarker^Secretina"
PATIENT_ID = "PII-ID-8675309"
MARKERS = (b"Zzpiimarker", b"Secretina", b"8675309")


# ---------------------------------------------------------------------- (a) no pickles
def _assert_plain_file_model(model_uri: str) -> list[str]:
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    pickles = [f for f in files if f.endswith((".pkl", ".pickle", ".joblib", ".cloudpickle"))]
    assert pickles == [], f"pickled files in {model_uri}: {pickles}"
    assert "python_model.pkl" not in {Path(f).name for f in files}
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in flavor  # the key a pickled PythonModel would add
    for weights in local.rglob("*.pt"):  # tensors only: loads under weights_only=True
        state = torch.load(weights, weights_only=True, map_location="cpu")
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    return files


def test_registered_model_artifacts_hold_no_pickle(registered_store):
    _, uri, _ = registered_store
    tracking.configure(uri)
    files = _assert_plain_file_model("models:/keel-synthetic@champion")
    assert "artifacts/predictor/weights.pt" in files and "artifacts/keel_meta.yaml" in files


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    mod, _, fn = dotted.rpartition(".")
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == fn
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == mod
    ]


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return "<absent>"


def test_no_loader_in_the_code_base_accepts_pickles():
    sources = [
        p for d in ("core", "apps", "pipelines") for p in (ROOT / d).rglob("*.py") if p.is_file()
    ]
    assert len(sources) > 30
    problems, torch_loads = [], 0
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        name = path.relative_to(ROOT)
        for call in _calls(tree, "torch.load"):
            torch_loads += 1
            if _keyword(call, "weights_only") is not True:
                problems.append(f"{name}:{call.lineno} torch.load without weights_only=True")
        for call in _calls(tree, "np.load"):
            if _keyword(call, "allow_pickle") is not False:
                problems.append(f"{name}:{call.lineno} np.load without allow_pickle=False")
        for fn in ("yaml.load", "yaml.unsafe_load", "pd.read_pickle"):
            problems += [f"{name}:{c.lineno} {fn}" for c in _calls(tree, fn)]
        for node in ast.walk(tree):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for m in mods:
                if m.split(".")[0] in {"pickle", "cloudpickle", "dill", "joblib"}:
                    problems.append(f"{name}:{node.lineno} imports {m}")
    assert problems == []
    assert torch_loads >= 4  # every app predictor and the synthetic example load weights


# ---------------------------------------------------------------------- (b) + (c) medical
def _series_with_identity(src: Path, dst: Path, series_uid: str | None = None) -> Path:
    """A copy of ``src`` whose slices carry the marker patient identity (and ``series_uid``)."""
    shutil.copytree(src, dst)
    for f in sorted(dst.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.OtherPatientIDs = PATIENT_ID
        ds.PatientBirthDate = "19700101"
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
        ds.save_as(f, enforce_file_format=True)
    return dst


def _leaks(folder: Path) -> list[str]:
    found = []
    for p in folder.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            found += [f"{p.relative_to(folder)}: {m.decode()}" for m in MARKERS if m in data]
    return found


@pytest.fixture(scope="module")
def medical_inputs(tmp_path_factory):
    from apps.medical.synthetic import SyntheticConfig, make_phantom, write_series

    base = tmp_path_factory.mktemp("medical_safety")
    clean = base / "clean"
    write_series(make_phantom(31, 0, SyntheticConfig(size="tiny")), clean, seed=31)
    inputs = base / "inputs"
    inputs.mkdir()
    good = _series_with_identity(clean, inputs / "patient_series")
    climbing = _series_with_identity(clean, inputs / "climbing", "1.2.840/../../../evil_uid")
    broken = _series_with_identity(clean, inputs / "broken")
    first = sorted(broken.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    del ds.ImagePositionPatient  # -> a rejected series whose message names the file
    ds.save_as(first, enforce_file_format=True)
    assert all(m in first.read_bytes() for m in MARKERS[:2])  # the marker is in the input
    return base, {"good": good, "climbing": climbing, "broken": broken}


def _medical_predictor():
    from apps.medical.predictor import NoduleDetector, build_detector, build_fp_model
    from tests.apps.medical.tiny import tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    return NoduleDetector(cfg, build_detector(cfg), build_fp_model(cfg))


@pytest.mark.slow  # logs, registers and scores a (tiny, untrained) two-stage detector
def test_patient_identity_never_leaves_in_outputs_or_mlflow(medical_inputs, tmp_path):
    import mlflow

    from core.pyfunc import log_predictor
    from pipelines.score import score

    _, series = medical_inputs
    store, out = tmp_path / "store", tmp_path / "out"
    tracking.configure(None, store)
    predictor = _medical_predictor()
    example = pd.DataFrame({"series_path": [str(series["good"])]})
    with mlflow.start_run(experiment_id=tracking.get_or_create_experiment("keel-medical-pii")):
        info = log_predictor(
            predictor, "medical", input_example=example, registered_model_name="keel-medical-pii"
        )
    model_uri = f"models:/keel-medical-pii/{info.registered_model_version}"
    _assert_plain_file_model(model_uri)

    # what `keel medical score` runs: pipelines.score over a file of series folders
    (tmp_path / "in").mkdir()
    inp = tmp_path / "in" / "series.csv"
    pd.DataFrame({"series_path": [str(series["good"]), str(series["broken"])]}).to_csv(
        inp, index=False
    )
    report = score(model_uri, inp, out / "scored.parquet", progress=False)
    scored = pd.read_parquet(out / "scored.parquet")
    rejects = pd.read_parquet(out / "scored.rejects.parquet")
    assert report.rows_out == len(scored) > 0 and scored["probability"].notna().all()
    assert len(rejects) == 1 and "ImagePositionPatient" in rejects["reject_reason"].iloc[0]

    # DICOM SRs of the findings, as the predictor writes them with an sr_dir
    predictor.sr_dir = out / "sr"
    predictor.predict(pd.DataFrame({"series_path": [str(series["good"])]}))
    srs = sorted((out / "sr").iterdir())
    assert len(srs) == 1
    sr = pydicom.dcmread(srs[0])
    assert str(sr.PatientName) == "" and str(sr.PatientID) == ""

    assert _leaks(out) == [], "patient identity in scoring outputs"
    assert _leaks(store) == [], "patient identity in the MLflow store or artifacts"
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) >= 2  # the model-logging run and the scoring run
    text = runs.astype(str).to_csv().encode()
    assert not [m for m in MARKERS if m in text]

    # positive control: asked explicitly, the identity IS written, so the scan above can see it
    from apps.medical.dicom_io import find_series, load_series
    from apps.medical.preprocess import Scan
    from apps.medical.sr import write_sr

    files = next(iter(find_series(series["good"]).values()))
    vol = load_series(files)
    scan = Scan(array=vol.array, affine=vol.affine, series_uid=vol.series_uid)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    cands = predictor.detect_volume(scan)
    write_sr(cands, scan, sources, tmp_path / "asked" / "sr.dcm", include_patient_identity=True)
    assert _leaks(tmp_path / "asked")


def test_series_uid_cannot_climb_out_of_the_sr_folder(medical_inputs, tmp_path):
    base, series = medical_inputs
    predictor = _medical_predictor()
    sr_dir = tmp_path / "deep" / "er" / "sr"
    predictor.sr_dir = sr_dir
    out = predictor.predict(pd.DataFrame({"series_path": [str(series["climbing"])]}))
    assert out["reject_reason"].isna().all()
    assert set(out["seriesuid"]) == {"1.2.840/../../../evil_uid"}  # reported as it is
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert [p.parent.resolve() for p in written] == [sr_dir.resolve()]
    assert written[0].name == "1.2.840_.._.._.._evil_uid.dcm"
    assert not list(base.rglob("evil_uid*")) and not list(tmp_path.rglob("evil_uid*"))
    assert np.isfinite(out["probability"]).all()
