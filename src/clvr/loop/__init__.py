"""The closed loop: plan -> generate -> verify -> correct -> stop.

roles.py (registries + protocols), controller.py (symbolic world controller), verify.py (passive + active
verification), run.py (the loop), trace.py (what happened), oracle.py (oracle generators for ceilings/tests),
vlm_controller.py / vlm_verifier.py (the "openai" controller and VLM judge, registered when first asked for),
batch.py (`clvr generate --metadata`: many prompts into GenEval's folder layout).
Importing this package registers the world controller, the world verifier and the oracle generators.
"""

from clvr.loop import controller, oracle, verify  # noqa: F401  (registration)
from clvr.loop.roles import make_controller, make_verifier
from clvr.loop.run import loop, run_loop, run_many
from clvr.loop.trace import Trace

__all__ = ["loop", "run_loop", "run_many", "Trace", "make_controller", "make_verifier"]
