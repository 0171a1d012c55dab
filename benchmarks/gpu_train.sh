#!/usr/bin/env bash
# Not run in CI. The training engine (clvr.train.engine) on one GPU: bf16, the gpu-4b profile (the world generator
# at GPU-sized settings, ZeRO-2), one process without a launcher. Prints samples/s and peak GPU memory; last
# line JSON. Needs a CUDA build of torch (infra/Dockerfile) and a visible GPU.
#   benchmarks/gpu_train.sh                 # STEPS=20 WARMUP=3, the profile's global batch
#   BATCH=256 STEPS=50 benchmarks/gpu_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
"$PY" - "${STEPS:-20}" "${WARMUP:-3}" "${BATCH:-0}" <<'PYEOF'
import json
import sys

import torch

from clvr.config import load_config
from clvr.train.bench_train import measure

steps, warmup, batch = (int(a) for a in sys.argv[1:4])
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu_train.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
cfg = load_config("gpu-4b", [f"pretrain.batch_size={batch}"] if batch else [])
res = measure("engine", cfg, steps, warmup, None)
out = {"profile": "gpu-4b", "gpu": torch.cuda.get_device_name(), "precision": "bf16",
       "zero_stage": cfg.engine.zero_stage, "global_batch": cfg.pretrain.batch_size, "steps_timed": steps,
       "samples_per_s": round(res["samples_per_s"], 1), "peak_gpu_mem_gb": res["peak_gpu_mem_gb"],
       "peak_rss_mb": round(res["peak_rss_mb"], 1)}
print(f"{out['samples_per_s']} samples/s, peak GPU memory {out['peak_gpu_mem_gb']} GB ({out['gpu']})")
print(json.dumps(out))
PYEOF
