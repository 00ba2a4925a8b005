"""Specs: what a question is about, as data.

Owns the model description built from an HF ``config.json`` (``ModelSpec``), the training and
inference set-ups (``TrainingSetup``, ``InferenceSetup``), hardware (``GpuSpec``), calibration
profiles (their schema, read from JSON) and the catalogs in ``models_catalog/``. Everything here
is validated once, at the edge, and frozen. May import only ``planner.errors`` and ``planner.units``.
"""
