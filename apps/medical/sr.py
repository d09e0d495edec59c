"""DICOM Structured Report (TID 1500 measurement report, Comprehensive 3D SR) of findings.

One finding per candidate at or above ``threshold``: a 3-D point (SCOORD3D POINT in the
series' frame of reference, i.e. the candidate's LPS world mm), finding type "Nodule", and a
"nodule probability" measurement. Patient name/ID/birth date/sex are NOT copied from the
source images unless ``include_patient_identity=True``: highdicom copies them by default,
so they are blanked after construction (type-2 attributes stay present but empty).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from apps.medical.errors import MedicalDataError

PATIENT_IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
PROBABILITY_CODE = ("KEEL001", "99KEEL", "Nodule probability")
COUNT_CODE = ("KEEL002", "99KEEL", "Number of nodule candidates over threshold")
DEVICE_NAME = "Keel lung nodule detector"


def write_sr(
    candidates: pd.DataFrame,
    volume: Any,
    source_datasets: Sequence[Any],
    path: str | Path,
    threshold: float = 0.5,
    include_patient_identity: bool = False,
    max_findings: int = 100,
) -> Path:
    """Write a Comprehensive 3D SR with one point finding per candidate >= ``threshold``.

    ``candidates``: LUNA16 rows (``coordX/Y/Z`` world LPS mm, ``probability``) of ONE
    series; ``volume``: its ``CTVolume``/``Scan`` (series UID check); ``source_datasets``:
    the series' pydicom datasets (pixel data not needed), referenced as evidence. Written
    atomically (temp file + ``os.replace``). Returns ``path``.
    """
    import highdicom as hd
    from highdicom.sr import (
        CodedConcept,
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        GraphicTypeValues3D,
        ImageRegion3D,
        Measurement,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes

    if not source_datasets:
        raise MedicalDataError("write_sr: no source DICOM datasets given for the evidence")
    uid = str(getattr(volume, "series_uid", source_datasets[0].SeriesInstanceUID))
    if str(source_datasets[0].SeriesInstanceUID) != uid:
        raise MedicalDataError(
            f"write_sr: source datasets are of series {source_datasets[0].SeriesInstanceUID}, "
            f"the volume is {uid}"
        )
    frame_uid = str(source_datasets[0].get("FrameOfReferenceUID", ""))
    if not frame_uid:
        raise MedicalDataError("write_sr: the source images have no FrameOfReferenceUID")
    rows = candidates.dropna(subset=["coordX", "coordY", "coordZ", "probability"])
    if "seriesuid" in rows:
        rows = rows[rows["seriesuid"].astype(str) == uid]
    rows = rows[rows["probability"] >= threshold].sort_values("probability", ascending=False)
    rows = rows.head(max_findings)

    findings = []
    for i, row in enumerate(rows.itertuples(), start=1):
        region = ImageRegion3D(
            graphic_type=GraphicTypeValues3D.POINT,
            graphic_data=np.array([[row.coordX, row.coordY, row.coordZ]], dtype=np.float64),
            frame_of_reference_uid=frame_uid,
        )
        findings.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=hd.UID(), identifier=f"nodule candidate {i}"
                ),
                referenced_region=region,
                finding_type=codes.SCT.Nodule,
                measurements=[
                    Measurement(
                        name=CodedConcept(*PROBABILITY_CODE),
                        value=float(row.probability),
                        unit=codes.UCUM.NoUnits,
                    )
                ],
            )
        )
    context = ObservationContext(
        observer_device_context=ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=hd.UID(), name=DEVICE_NAME
            ),
        )
    )
    if not findings:  # TID 1500 needs one group: state "0 candidates" explicitly
        from highdicom.sr import MeasurementsAndQualitativeEvaluations

        findings.append(
            MeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="no findings"),
                measurements=[
                    Measurement(name=CodedConcept(*COUNT_CODE), value=0.0, unit=codes.UCUM.NoUnits)
                ],
            )
        )
    report = MeasurementReport(
        observation_context=context,
        procedure_reported=CodedConcept("25045-6", "LN", "CT unspecified body region"),
        imaging_measurements=findings,
    )
    # highdicom copies patient/study elements by reference: deep copies keep the callers'
    # datasets untouched when the identity is blanked below
    sr = Comprehensive3DSR(
        evidence=[copy.deepcopy(ds) for ds in source_datasets],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Keel",
        series_description="Lung nodule candidates (Keel)",
        is_complete=True,
    )
    if not include_patient_identity:
        for keyword in PATIENT_IDENTITY:
            if keyword in sr:
                setattr(sr, keyword, "")
        for keyword in ("OtherPatientIDs", "OtherPatientNames", "PatientAge", "PatientAddress"):
            if keyword in sr:
                delattr(sr, keyword)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sr.save_as(tmp, enforce_file_format=True)
    os.replace(tmp, path)
    return path


def read_sr_findings(path: str | Path) -> list[dict[str, Any]]:
    """The point findings of an SR written by :func:`write_sr`: ``[{"xyz", "probability"}]``."""
    import pydicom

    ds = pydicom.dcmread(path)
    out: list[dict[str, Any]] = []

    def collect(items: Any, found: dict[str, Any]) -> None:
        for item in items:
            vt = item.get("ValueType")
            if vt == "SCOORD3D" and item.get("GraphicType") == "POINT":
                found["xyz"] = [float(v) for v in item.GraphicData]
            elif vt == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == PROBABILITY_CODE[2]:
                found["probability"] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                collect(item.ContentSequence, found)

    def walk(items: Any) -> None:
        for item in items:
            name = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            if item.get("ValueType") == "CONTAINER" and name == "Measurement Group":
                found: dict[str, Any] = {}
                collect(item.get("ContentSequence", []), found)
                if "xyz" in found:
                    out.append(found)
            elif "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(ds.ContentSequence)
    return out
