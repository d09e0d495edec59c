"""Lung-nodule detection on chest CT: DICOM reading, annotations, transforms, LUNA16 FROC.

Submodules are imported explicitly (``from apps.medical.dicom_io import load_series``) so
that importing the package stays cheap and never pulls in MONAI or matplotlib.
"""
