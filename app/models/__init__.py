"""Typed faust.Record models, one module per area (pipelines, windows, patterns)."""
