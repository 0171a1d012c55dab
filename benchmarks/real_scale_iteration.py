"""One loop iteration at real scale, timed part by part (GPU script; not run in CI).

    python benchmarks/real_scale_iteration.py            # FLUX.2 [klein] 4B, 1024 px, bf16, on the GPU
    python benchmarks/real_scale_iteration.py --size 9b  # klein 9B
    python benchmarks/real_scale_iteration.py --tiny     # the tiny test sizes on the CPU, in seconds (a check)

No internet and no weights needed: every model is the real architecture with random weights (the same classes a
checkpoint loads into; timing does not depend on the values). The parts of one iteration:
* controller: a Qwen3-VL-8B-shaped VLM decodes one step JSON from the canvas + state, under constrained decoding,
  its constant prompt prefix KV-cached (a warm-up decision fills the cache; the timed one reuses it);
* generator: one edit of the canvas (the reference image; one grounded cell blended, clvr.models.klein) at 28 steps
  + CFG (base) and at 4 steps (distilled: the same weights with `is_distilled` set);
* verifier: the open-vocabulary detector (OWLv2 + CLIP colours) on the edited image.
iteration = controller + edit + verifier. Prints one JSON line: seconds per part, iteration seconds at 28 and at 4
steps, the speedup, seconds per NFE, peak GPU memory (peak RSS on the CPU), and the target (<= 3 s at 4 steps).
Anchors measured earlier on an H100 at 1024^2: generator forward 86.6 ms text-to-image, 183 ms with 1 reference;
4-step edit ~0.73 s; the paper reports 12.6 s per DSWM iteration.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clvr.generator import GenRequest  # noqa: E402
from clvr.learned.vlm_controller import build_random_vlm_controller  # noqa: E402
from clvr.models.klein import SIZES, KleinGenerator, build_klein_pipeline  # noqa: E402
from clvr.openvocab import build_random_detector  # noqa: E402

PROMPT = "a red circle above a blue square"
TARGET_S = 3.0  # per iteration at 4 steps
GRID = 4


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def build_controller(tiny: bool, device: str, dtype: torch.dtype):
    """The VLM controller (clvr.learned.vlm_controller): Qwen3-VL-8B-shaped, random weights, its prefix KV cache."""
    return build_random_vlm_controller("tiny" if tiny else "8b", GRID, device=device, dtype=dtype)


def build_verifier(tiny: bool, device: str):
    """The open-vocabulary detector (clvr.openvocab: OWLv2 + CLIP colours), random weights, over the world's classes
    as the loop's `openvocab` verifier perceives (the GenEval list's 80 queries would time a scorer, not the loop)."""
    return build_random_detector("tiny" if tiny else "real", GRID, classes="world", device=device)


def controller_state(canvas: np.ndarray, ctl):
    """A loop state on `canvas`: the prompt's plan, the world verifier's report of an empty scene (the VLM reads the
    canvas itself)."""
    from clvr.loop.roles import LoopState, make_verifier
    from clvr.world.render import blank

    plan = ctl.plan(PROMPT)
    seen = make_verifier("world").perceive(blank(GRID, 16))
    return LoopState(plan, seen.scene, canvas, active=make_verifier("world").active(seen, plan), max_calls=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("4b", "9b"), default="4b")
    ap.add_argument("--tiny", action="store_true", help="the tiny test sizes on the CPU (checks the script)")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default 1024; --tiny 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tiny = args.tiny
    device = "cpu" if tiny else "cuda"
    if not tiny and not torch.cuda.is_available():
        sys.exit("real_scale_iteration: no CUDA device (run with --tiny for the CPU check)")
    dtype = torch.float32 if tiny else torch.bfloat16
    size = "tiny" if tiny else args.size
    res = args.resolution or (64 if tiny else 1024)
    max_len = 64 if tiny else 512

    t_build = time.perf_counter()
    pipe = build_klein_pipeline(SIZES[size], args.seed, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    ctl = build_controller(tiny, device, dtype)
    det = build_verifier(tiny, device)
    build_s = time.perf_counter() - t_build
    if device.startswith("cuda"):  # the peak below: the weights + one iteration, not the float32 construction
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None

    def generator(distilled: bool) -> KleinGenerator:
        pipe.register_to_config(is_distilled=distilled)
        return KleinGenerator(pipe, res, GRID, max_len, base_steps=28, distilled_steps=4, base_guidance=4.0)

    trace = ["a blue square at row 2, column 1"]
    t2i = GenRequest(PROMPT, seed=args.seed)
    g4 = generator(True)
    canvas = g4.generate(t2i).image  # warm-up (kernels, allocator) and the canvas every edit starts from
    t2i_4 = timed(lambda: g4.generate(t2i), device)[1]
    edit = GenRequest("add a red circle at row 1, column 1", trace=trace, reference=canvas, regions=((1, 1),),
                      seed=args.seed + 1)
    g4.generate(edit)  # warm-up of the reference path
    edited, edit_4 = timed(lambda: g4.generate(edit).image, device)
    g28 = generator(False)
    edit_28 = timed(lambda: g28.generate(edit), device)[1]
    pipe.register_to_config(is_distilled=True)

    state = controller_state(canvas, ctl)
    ctl.propose(state)  # warm-up: fills the prefix KV cache
    controller_s = timed(lambda: ctl.propose(state), device)[1]
    det(edited)  # warm-up
    verifier_s = timed(lambda: det(edited), device)[1]

    it4, it28 = edit_4 + controller_s + verifier_s, edit_28 + controller_s + verifier_s
    peak = (torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    print(json.dumps({
        "bench": "real_scale_iteration", "size": size, "device": torch.cuda.get_device_name() if not tiny else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "resolution": res, "build_s": round(build_s, 2),
        "controller_s": round(controller_s, 4),
        "t2i_4_steps_s": round(t2i_4, 4), "edit_4_steps_s": round(edit_4, 4), "edit_28_steps_cfg_s": round(edit_28, 4),
        "s_per_nfe_t2i": round(t2i_4 / g4.nfe, 4), "s_per_nfe_edit": round(edit_4 / g4.nfe, 4),
        "nfe_4": g4.nfe, "nfe_28_cfg": g28.nfe,
        "verifier_s": round(verifier_s, 4),
        "iteration_4_steps_s": round(it4, 4), "iteration_28_steps_cfg_s": round(it28, 4),
        "speedup": round(it28 / it4, 2), "target_iteration_4_steps_s": TARGET_S,
        "meets_target": None if tiny else bool(it4 <= TARGET_S),  # the target is for the real sizes on a GPU
        "weights_gpu_memory_gib": None if weights is None else round(weights, 2),
        ("peak_gpu_memory_gib" if not tiny else "peak_rss_gib"): round(peak, 2),
    }))


if __name__ == "__main__":
    main()
