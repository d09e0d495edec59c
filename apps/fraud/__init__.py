"""Keel fraud app: transaction readers, synthetic data, causal features, time-ordered
splits, protocol metrics, thresholds and a LightGBM baseline.

Modules are imported directly (``from apps.fraud.features import FeatureBuilder``) so that
importing the package stays cheap (LightGBM and matplotlib load only where used).
"""
