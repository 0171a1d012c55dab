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
# Prefect's temporary local server (pipeline runs, tests) can take > 20 s (its default) to start on 2 busy cores.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: setup run test weights clean

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

# The shipped generator weights (src/clvr/weights/{base,distilled}), from scratch on CPU (~70 min on 2 cores):
# pretrain (conf/release.yaml), a move-heavy fine-tune of it, 4-NFE distillation of the fine-tuned base; then
# the two final/ folders are re-saved into the package (model cards are kept). See the model cards.
FINETUNE := pretrain.init=runs/release/pretrain/final pretrain.out=runs/release/finetune pretrain.steps=1200 \
	pretrain.lr=0.0003 pretrain.warmup=50 "pretrain.op_probs=[0.25,0.15,0.15,0.45]" pretrain.edit_frac=0.8 \
	pretrain.eval_every=1200 pretrain.ckpt_every=200 pretrain.seed=1
weights: setup
	$(VENV)/bin/clvr world pretrain --profile release
	$(VENV)/bin/clvr world pretrain --profile release $(FINETUNE)
	$(VENV)/bin/clvr world distill --profile release
	$(VENV)/bin/clvr world ship runs/release/finetune/final base
	$(VENV)/bin/clvr world ship runs/release/distill/final distilled

clean:
	rm -rf $(VENV) runs .pytest_cache
