"""Profiles and infra/ files: every profile in conf/ loads and validates, and every `clvr` command line, profile,
entrypoint and volume claim that a file in infra/ names exists (parsed with clvr's own CLI)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from clvr.config import load_config, profiles

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCH = {"-m", "--module"}


def strings(node) -> list[str]:
    """Every string in a parsed YAML/JSON document (keys and values)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def mappings(node) -> list[dict]:
    if isinstance(node, dict):
        return [node, *[m for v in node.values() for m in mappings(v)]]
    if isinstance(node, list):
        return [m for v in node for m in mappings(v)]
    return []


def documents(path: Path) -> list:
    """A file of infra/ as parsed documents (YAML, JSON), or its text lines (Dockerfile, anything else)."""
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        return [d for d in yaml.safe_load_all(text) if d is not None]
    if path.suffix == ".json":
        return [json.loads(text)]
    return [" ".join(text.replace("\\\n", " ").splitlines())]


def clvr_commands(text: str) -> list[list[str]]:
    """The argument lists of every `clvr ...`, `python -m clvr ...` or `torchrun ... --module clvr ...` in a
    string (up to a shell separator)."""
    try:
        toks = shlex.split(text, comments=False)
    except ValueError:
        toks = text.split()
    out = []
    for i, t in enumerate(toks):
        if t == "clvr" and (i == 0 or toks[i - 1] in LAUNCH or toks[i - 1] in ("&&", ";", "|", "exec")):
            args = []
            for a in toks[i + 1:]:
                if a in ("&&", ";", "|", "||"):
                    break
                args.append(a)
            if args:  # a bare "clvr" is a name (of the project, a Prefect project), not a command
                out.append(args)
    return out


def parse(args: list[str]):
    """Parse `clvr ARGS` down to the leaf command with clvr's own CLI (typer/click), without running it."""
    from clvr.cli import _register, app

    _register()
    cmd = typer.main.get_command(app)
    ctx = cmd.make_context("clvr", list(args), resilient_parsing=False)
    while hasattr(cmd, "resolve_command"):  # a group (typer vendors its own click)
        rest = [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


@pytest.mark.parametrize("profile", profiles())
def test_every_profile_loads_and_validates(profile, monkeypatch):
    cfg = load_config(profile)
    assert cfg.profile == profile
    # the multi-node job launches 16 ranks: a GPU profile's global batches must split over them
    if profile.startswith("gpu-"):
        for k, v in dict(RANK="0", WORLD_SIZE="16", LOCAL_RANK="0", MASTER_ADDR="h", MASTER_PORT="1").items():
            monkeypatch.setenv(k, v)
        load_config(profile)


def test_every_command_in_infra_parses_and_names_an_existing_profile():
    known, seen = set(profiles()), 0
    for path in infra_files():
        for doc in documents(path):
            texts = strings(doc) if not isinstance(doc, str) else [doc]
            for text in texts:
                for args in clvr_commands(text):
                    ctx = parse(args)
                    seen += 1
                    prof = ctx.params.get("profile")
                    assert prof is None or prof in known, f"{path.name}: `clvr {' '.join(args)}`: no profile {prof}"
            for m in mappings(doc):
                if "profile" in m:  # e.g. a Prefect deployment's flow parameters
                    assert m["profile"] in known, f"{path.name}: unknown profile {m['profile']!r}"
                if "entrypoint" in m:  # file.py:function
                    file, _, fn = m["entrypoint"].partition(":")
                    assert re.search(rf"^def {fn}\b", (ROOT / file).read_text(), re.M), f"{path.name}: {m['entrypoint']}"
    assert seen >= 1  # at least the multi-node job's command


def test_every_volume_claim_in_infra_is_defined_in_infra():
    docs = [d for p in infra_files() if p.suffix in (".yaml", ".yml") for d in documents(p)]
    defined = {d["metadata"]["name"] for d in docs if isinstance(d, dict) and d.get("kind") == "PersistentVolumeClaim"}
    claims = {m["claimName"] for d in docs for m in mappings(d) if "claimName" in m}
    assert claims and claims <= defined, f"claims without a PersistentVolumeClaim in infra/: {claims - defined}"


def test_the_multi_node_job_runs_ranks_of_one_training():
    job = next(d for d in documents(INFRA / "deepspeed-job.yaml") if d.get("kind") == "Job")
    text = " ".join(job["spec"]["template"]["spec"]["containers"][0]["args"])
    toks = shlex.split(text)
    nnodes = int(next(t.split("=")[1] for t in toks if t.startswith("--nnodes=")))
    nproc = int(next(t.split("=")[1] for t in toks if t.startswith("--nproc-per-node=")))
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nnodes
    gpus = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == nproc
    (args,) = clvr_commands(text)
    ctx = parse(args)
    cfg = load_config(ctx.params["profile"])
    assert cfg.pretrain.batch_size % (nnodes * nproc) == 0


def test_a_bad_command_does_not_parse():
    with pytest.raises(Exception, match="No such option"):
        parse(["stage", "pretrain", "--profil", "gpu-4b"])
