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

.PHONY: setup run test weights weights-baselines clean

setup: $(STAMP)

# torch first (the CPU build on disk), then the project against the full lock.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e .
	touch $(STAMP)

# The retrain flow (synthesize, controller_sft, sft, evaluate) from the shipped weights in src/clvr/weights.
run: setup
	$(VENV)/bin/clvr pipeline run --profile cpu

# Two workers, whole files each (--dist loadfile): a file's module-scoped fixtures (the pipeline runs) run once;
# files in collection order (tests/conftest.py puts the longest, test_pipeline.py, first), not xdist's by size.
# One OpenMP thread per process: with torch's default (a thread per core) each worker's processes spin on both
# cores, and a pipeline stage beside a 2-rank training test ran 7x slower.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# The shipped generator weights (src/clvr/weights/{base,distilled}), from scratch on CPU: the foundation flow on
# conf/release.yaml, on the varied world: the cell autoencoder, pretrain on its latents, the move-heavy fine-tune,
# progressive distillation of the fine-tuned base to 4 NFE, two more runs of its student on the base's own trajectory
# (trajectory, rebalance), then `ship` re-saves the fine-tune as base and rebalance's student as distilled into the
# package, keeping the model cards. See the model cards for each part's time.
weights: setup
	$(VENV)/bin/clvr pipeline run --flow foundation --profile release

# The distilled model card's comparison, after `make weights`: the naive baseline "base trained at 4 steps" (the
# fine-tuned base trained on as long as the distillation, t only at the 4 sampler sigmas) and bench-generator on
# both 4-step models (each also prints the base at 28 steps + CFG and the base_4 row: the base at 4 steps).
B4    := pretrain.init=runs/release/finetune/final pretrain.out=runs/release/base-trained-4 pretrain.train_sigmas=4 \
	pretrain.text_dropout=0 pretrain.steps=1200 pretrain.lr=0.0003 pretrain.warmup=20 pretrain.eval_every=1200 \
	pretrain.ckpt_every=200 pretrain.seed=2
BENCH := $(VENV)/bin/clvr world bench-generator --profile release --model runs/release/finetune/final --no-speed
weights-baselines: setup
	$(VENV)/bin/clvr world pretrain --profile release $(B4)
	$(BENCH) --distilled runs/release/distill-rebalance/final > runs/release/bench-distilled.out
	$(BENCH) --distilled runs/release/base-trained-4/final > runs/release/bench-base-trained-4.out

clean:
	rm -rf $(VENV) runs .pytest_cache
