# Two commands do all set-up: `make run` and `make test` (both idempotent).
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1

.PHONY: setup run test clean

setup: $(STAMP)

# torch first (the CPU build on disk), then the project against the full lock.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e .
	touch $(STAMP)

run: setup
	$(VENV)/bin/clvr pipeline run --profile cpu

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
