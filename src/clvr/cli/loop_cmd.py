"""`clvr generate` (one prompt, or a metadata file into GenEval's layout), `clvr eval probe`, `clvr eval geneval-world`,
`clvr eval speed`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from clvr.cli import ProfileOpt, app
from clvr.cli.groups import eval_app
from clvr.config import MAX_SEED
from clvr.errors import ClvrError

ModelOpt = typer.Option(None, "--model", "-m",
                        help="base | distilled | checkpoint folder | oracle | noisy-oracle (default: config loop.model)")
SetOpt = typer.Option(None, "--set", help="config override key=value (repeatable)")
ControllerOpt = typer.Option(None, "--controller",
                             help="controller registry key: world | openai | learned (default: config loop.controller; "
                                  "the same as --set loop.controller=KEY)")
VerifierOpt = typer.Option(None, "--verifier",
                           help="verifier registry key: world | openai | openvocab (default: config loop.verifier; the same as "
                                "--set loop.verifier=KEY; openai's endpoint is the config's judge section)")
# The config sections each command reads: an override of another section is an error, not silently ignored.
GENERATE_USES = ("world", "loop", "controller", "judge", "klein", "detector", "eval")  # detector: loop.verifier=openvocab
EVAL_USES = GENERATE_USES  # the eval commands run the same loop with the same roles
TRACE_FILES = {"trace.json", "final.png", "filmstrip.png", "steps"}
MaxCallsOpt = typer.Option(["1,2,3,4,unbounded"], "--max-calls",
                           help="call budgets to also run the loop at (comma-separated or repeated; "
                                "unbounded = no budget; 'off' = none, only the config's loop)")


def _budgets(values: list[str]) -> list[int]:
    from clvr.probe import parse_budgets

    return [] if [v.strip().lower() for v in values] == ["off"] else parse_budgets(values)


def _cfg(profile: str, overrides: list[str] | None, uses: tuple[str, ...], command: str,
         controller: str | None = None, verifier: str | None = None):
    """The config, with `--controller` and `--verifier` as the last overrides; an unknown controller or verifier
    key fails here, before any weights load."""
    from clvr.config import load_config
    from clvr.loop.run import check_controller, check_verifier

    if controller is not None:
        overrides = [*(overrides or []), f"loop.controller={controller}"]
    if verifier is not None:
        overrides = [*(overrides or []), f"loop.verifier={verifier}"]
    cfg = load_config(profile, overrides, uses=uses, command=command)
    check_controller(cfg.loop.controller)
    check_verifier(cfg.loop.verifier)
    return cfg


def _earlier_trace(out: Path) -> bool:
    """A `clvr generate` folder from before output markers: only the files generate writes, trace.json among them."""
    return (out / "trace.json").is_file() and {p.name for p in out.iterdir()} <= TRACE_FILES


def _load(cfg, model: str):
    """The generator, loaded without diffusers'/transformers' progress bars (one summary line is the output)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from clvr.loop.run import load_generator


    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    return load_generator(cfg, model)


@app.command("generate")
def generate(prompt: Optional[str] = typer.Argument(None, help="what to draw, e.g. \"a red circle above a blue square\" "
                                                    "(or --metadata FILE for a batch)"),
             out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder of one prompt "
                                                "(default runs/generate)"),
             metadata: Optional[Path] = typer.Option(None, "--metadata", help="batch: a GenEval metadata JSONL file, "
                                                     "one prompt per line (instead of PROMPT)"),
             outdir: Optional[Path] = typer.Option(None, "--outdir", help="batch: the GenEval-layout output folder "
                                                   "(DIR/00000/metadata.jsonl, DIR/00000/samples/0000.png; resumable)"),
             samples: Optional[int] = typer.Option(None, "--samples", min=1, max=10_000,
                                                   help="batch: images per prompt (default 1)"),
             mode: str = typer.Option("loop", "--mode", help="loop (plan-generate-verify-correct), single (one "
                                      "text-to-image call) or rewrite (the prompt rewritten once into one grounded "
                                      "step of every object, one call, no verification)"),
             model: Optional[str] = ModelOpt, controller: Optional[str] = ControllerOpt,
             verifier: Optional[str] = VerifierOpt,
             seed: int = typer.Option(0, "--seed", min=0, max=MAX_SEED, help="layout and sampling seed (batch: "
                                      "sample k of line i uses seed + i * samples + k)"),
             profile: str = ProfileOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Generate one image: writes final.png, filmstrip.png (every step with its caption) and trace.json.
    OUT is replaced whole (never mixed with an earlier trace); a folder generate did not make is refused.
    With --metadata FILE --outdir DIR: every prompt of FILE into GenEval's layout, for `clvr eval geneval DIR`
    (resumable; loop/rewrite prompts the controller cannot plan are skipped with DIR/NNNNN/skipped.txt and exit 1).
    Last line of a batch: one JSON object."""
    if metadata is not None or outdir is not None:
        if prompt is not None or out is not None:
            raise ClvrError("give PROMPT [--out DIR] or --metadata FILE --outdir DIR, not both")
        if metadata is None or outdir is None:
            raise ClvrError("a batch needs both --metadata FILE and --outdir DIR")
        _generate_batch(metadata, outdir, samples or 1, mode, model, controller, verifier, seed, profile, overrides)
        return
    if prompt is None:
        raise ClvrError("give a PROMPT, or --metadata FILE --outdir DIR for a batch")
    if samples is not None:
        raise ClvrError("--samples is for a batch (--metadata FILE --outdir DIR)")
    out = out or Path("runs/generate")
    from clvr.io import claim_dir, replace_own_dir
    from clvr.loop.controller import check_mode
    from clvr.loop.run import build_roles, run_loop
    from clvr.loop.trace import filmstrip

    cfg = _cfg(profile, overrides, GENERATE_USES, "generate", controller, verifier)
    check_mode(mode)
    claim_dir(out, "generate", _earlier_trace, "--out")  # before any work
    controller, verifier = build_roles(cfg)
    controller.plan(prompt, "loop", seed)  # a bad prompt (also unsatisfiable) fails here, before weights load
    generator = _load(cfg, model or cfg.loop.model)
    trace = run_loop(prompt, controller, generator, verifier, cfg.loop, seed, mode, cfg.world.grid, cfg.world.cell)

    def write(d: Path) -> None:
        trace.save(d)
        filmstrip(trace).save(d / "filmstrip.png")

    if replace_own_dir(out, "generate", write, _earlier_trace, "--out"):
        typer.echo(f"replaced the earlier output in {out}", err=True)
    typer.echo(f"{trace.summary()} -> {out}/final.png, {out}/filmstrip.png, {out}/trace.json")


def _generate_batch(metadata: Path, outdir: Path, samples: int, mode: str, model: str | None, controller: str | None,
                    verifier: str | None, seed: int, profile: str, overrides: list[str] | None) -> None:
    """`clvr generate --metadata FILE --outdir DIR` (clvr.loop.batch): every check, then the generator loads."""
    from clvr.judge import read_jsonl
    from clvr.loop.batch import generate_folder, prepare
    from clvr.loop.controller import check_mode
    from clvr.loop.run import build_roles

    cfg = _cfg(profile, overrides, GENERATE_USES, "generate", controller, verifier)
    check_mode(mode)
    records = read_jsonl(metadata)
    model = model or cfg.loop.model
    settings = {"mode": mode, "generator": cfg.loop.generator, "model": model, "controller": cfg.loop.controller,
                "verifier": cfg.loop.verifier, "samples": samples, "seed": seed}
    roles = build_roles(cfg)
    todo = prepare(cfg, records, outdir, settings, roles[0], str(metadata))
    generator = _load(cfg, model) if todo else None
    res = generate_folder(cfg, records, outdir, todo, settings, roles, generator, log=lambda m: typer.echo(m, err=True))
    if res["skipped"]:
        typer.echo(f"{res['skipped']} prompt(s) skipped: controller {cfg.loop.controller!r} cannot plan them "
                   f"(reasons in {outdir}/NNNNN/skipped.txt, e.g. {outdir}/{res['skipped_folders'][0]})", err=True)
    typer.echo(json.dumps(res))
    if res["skipped"]:
        raise typer.Exit(1)


@eval_app.command("probe")
def probe(n_per_tier: Optional[int] = typer.Option(None, "--n-per-tier", "-n", min=1, help="prompts per tier (default: config eval.n_per_tier)"),
          model: Optional[str] = ModelOpt, controller: Optional[str] = ControllerOpt,
          verifier: Optional[str] = VerifierOpt,
          out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: config eval.out)"),
          max_calls: List[str] = MaxCallsOpt,
          profile: str = ProfileOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Complexity probe: single-step vs loop over the 10 tiers (pass rate, AUC, I_eff, NFE, s/prompt), the
    open-loop rewrite baseline (config eval.rewrite), and the loop at each call budget of --max-calls. Last line:
    one JSON object with `single`, `rewrite`, `loop` and `budgets`."""
    from clvr.probe import run_probe

    from clvr.io import check_out_dir

    cfg = _cfg(profile, overrides, EVAL_USES, "eval probe", controller, verifier)
    budgets = _budgets(max_calls)
    check_out_dir(out or Path(cfg.eval.out), "--out")  # before the generator loads
    res = run_probe(cfg, _load(cfg, model or cfg.loop.model), n_per_tier, out=out, log=typer.echo, max_calls=budgets)
    typer.echo(f"wrote {Path(res['plot']).parent}/probe.json and {res['plot']}")
    typer.echo(json.dumps(res))


@eval_app.command("geneval-world")
def geneval_world(n: Optional[int] = typer.Option(None, "--n", "-n", min=1, help="prompts per GenEval tag (default: config eval.geneval_n)"),
                  model: Optional[str] = ModelOpt, controller: Optional[str] = ControllerOpt,
                  verifier: Optional[str] = VerifierOpt,
                  out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: config eval.out)"),
                  max_calls: List[str] = MaxCallsOpt,
                  profile: str = ProfileOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """The six GenEval suites in world vocabulary through generation + the judge, single-step, the open-loop
    rewrite baseline (config eval.rewrite) and loop, and the loop at each call budget of --max-calls. Last line:
    one JSON object."""
    from clvr.probe import run_geneval_world

    from clvr.io import check_out_dir

    cfg = _cfg(profile, overrides, EVAL_USES, "eval geneval-world", controller, verifier)
    budgets = _budgets(max_calls)
    check_out_dir(out or Path(cfg.eval.out), "--out")  # before the generator loads
    res = run_geneval_world(cfg, _load(cfg, model or cfg.loop.model), n, out=out, log=typer.echo, max_calls=budgets)
    typer.echo(json.dumps(res))


@eval_app.command("speed")
def speed(n: Optional[int] = typer.Option(None, "--n", "-n", min=1, help="prompts per row (default: config eval.speed_n)"),
          models: str = typer.Option("base,distilled", "--models", help="two generators: reference,fast"),
          iters: int = typer.Option(4, "--iters", min=1, max=32, help="loop iterations 1..ITERS"),
          profile: str = ProfileOpt, overrides: Optional[List[str]] = SetOpt) -> None:
    """Efficiency table: seconds per prompt for 1..4 loop iterations, base (28 steps + CFG) vs distilled
    (4 NFE), and the speedup. Last line: one JSON object."""
    from clvr.probe import run_speed

    cfg = _cfg(profile, overrides, EVAL_USES, "eval speed")
    names = [m.strip() for m in models.split(",") if m.strip()]
    if len(names) != 2:
        raise ClvrError(f"--models needs two generators, reference,fast (got {models!r})")
    res = run_speed(cfg, {name: _load(cfg, name) for name in names}, n, iters, log=typer.echo)
    typer.echo(json.dumps(res))
