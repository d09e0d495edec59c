"""Keel fraud app: transaction readers, synthetic data, causal features, time-ordered
splits, protocol metrics, thresholds, a LightGBM baseline, and the backbone model
(``inputs`` -> ``model`` -> ``calibration``), its ``predictor``, ``training`` flow,
``spec`` (for the pipelines) and ``estimator`` (notebook class).

Modules are imported directly (``from apps.fraud.features import FeatureBuilder``) so that
importing the package stays cheap (LightGBM and matplotlib load only where used).
"""
