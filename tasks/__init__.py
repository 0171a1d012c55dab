"""Prefect tasks and the helpers they use (DVC and git commands, MLflow tracking). Tasks pass paths, hashes
and run ids, never models. The library in src/clvr knows nothing of what is in here."""
