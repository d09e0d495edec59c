"""Predictive maintenance: remaining-useful-life (RUL) prediction with alarms.

Data side: C-MAPSS and generic sensor-table readers with validation and counted repairs
(``cmapss``, ``schema``, ``events``), per-operating-condition normalisation and RUL targets
(``preprocess``), causal sliding windows (``windows``), a synthetic run-to-failure fleet
(``synthetic``), and protocol-exact metrics, alarm policies and plots (``metrics``,
``alarms``, ``plots``).
"""
