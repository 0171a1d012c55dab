"""Prefect flows: `retrain` (the pipeline) and `reproduce` (rerun a tagged run and compare its metrics)."""
