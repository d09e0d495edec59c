"""Keel core: shared backbone, adapters, engine, tracking."""
