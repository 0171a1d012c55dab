"""Hostile inputs: the `clvr` CLI driven with bad input, as a new user would type it (issue 10).

(a) CATALOGUE: 99 hand-made cases in six families (prompts, config overrides, checkpoints, GenEval metadata and
    folders, output paths, numbers), each with its expected outcome: "ok" = exit 0 and the named output complete,
    "error" = exit 2 with one line naming what is wrong.
(b) generated cases: the hypothesis strategies below (shared with tests/test_hostile_inputs.py) over prompts,
    override strings, metadata lines, sample-file contents, seeds and output paths.

Every case runs in-process (sys.argv set, `clvr.cli.main` called, SystemExit caught, stdout/stderr captured) in a
fresh sandbox folder that is also the current directory, so a case costs milliseconds, not an interpreter start.
The contract checked on every case:
* exit code 0 or 2, and never a traceback;
* nothing outside the named output is written, changed or removed (`data_loss` counts changed or removed files,
  `stray_writes` new ones);
* the named output is complete after exit 0, and exactly as it was before after exit 2;
* a case whose expected outcome is "error" never exits 0 (`garbage_accepted`).

    PYTHONPATH=src python benchmarks/hostile_inputs.py [--generated 600]

Last line: one JSON object {"cases", "generated", "tracebacks", "garbage_accepted", "data_loss", ..., "by_family"}.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("CLVR_CONF_DIR", str(ROOT / "conf"))

D = "@D@"  # the sandbox folder, in a case's arguments
MAX_SEED = 2**32 - 1


# ---- running one case ------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under `root` (hidden ones too): relative path -> sha256 of the bytes, or "<dir>"."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = "<dir>"
        for name in filenames:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def invoke(args: list[str]) -> tuple[int | None, str, str, str]:
    """Run the CLI in this process: (exit code or None, stdout, stderr, traceback text of an escaped exception)."""
    from clvr.cli import main

    saved, out, err, tb = sys.argv, io.StringIO(), io.StringIO(), ""
    sys.argv = ["clvr", *args]
    rc: int | None = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 -- anything that escapes main() is a traceback for the user
        rc, tb = None, traceback.format_exc()
    finally:
        sys.argv = saved
    return rc, out.getvalue(), err.getvalue(), tb


@dataclass
class Case:
    """One CLI call. `args` may hold D (the sandbox); `out` is the named output, relative to the sandbox (None = the
    command must write nothing); `expect` is "ok", "error" or "any" (generated inputs without an oracle);
    `complete(sandbox)` checks the named output after exit 0; `needle`: text the error line must hold."""

    family: str
    name: str
    args: list[str]
    expect: str
    out: str | None = None
    setup: Callable[[Path], None] | None = None
    complete: Callable[[Path], bool] | None = None
    needle: str = ""


@dataclass
class Outcome:
    case: Case
    rc: int | None
    err: str
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _inside(path: str, out: str | None) -> bool:
    return out is not None and (path == out or path.startswith(out.rstrip("/") + "/"))


def run_case(case: Case, sandbox: Path | None = None) -> Outcome:
    """Run `case` in a fresh sandbox (made here, removed after, unless given) and check the contract."""
    own = sandbox is None
    sandbox = Path(tempfile.mkdtemp(prefix="clvr-hostile-")) if own else sandbox
    cwd = os.getcwd()
    try:
        if case.setup:
            case.setup(sandbox)
        before = snapshot(sandbox)
        os.chdir(sandbox)
        try:
            rc, _, err, tb = invoke([a.replace(D, str(sandbox)) for a in case.args])
        finally:
            os.chdir(cwd)
        after = snapshot(sandbox)
        out = None if case.out is None else os.path.normpath(case.out)
        problems = []
        if tb or rc is None or "Traceback (most recent call last)" in err:
            problems.append("traceback")
        elif rc not in (0, 2):
            problems.append(f"exit_{rc}")
        lost = [p for p, h in before.items() if not _inside(p, out) and after.get(p) != h]
        new = [p for p in after if p not in before and not _inside(p, out)]
        if lost:
            problems.append("data_loss")
        if new:
            problems.append("stray_writes")
        if rc == 2:
            inner_before = {p: h for p, h in before.items() if _inside(p, out)}
            inner_after = {p: h for p, h in after.items() if _inside(p, out)}
            if inner_before != inner_after:
                problems.append("data_loss" if inner_before else "incomplete")
            if case.needle and case.needle not in err:
                problems.append("weak_message")
        if rc == 0:
            if case.expect == "error":
                problems.append("garbage_accepted")
            elif case.complete is not None and not case.complete(sandbox):
                problems.append("incomplete")
        if rc == 2 and case.expect == "ok":
            problems.append("good_rejected")
        line = (tb.strip().splitlines() or [""])[-1] if tb else (err.strip().splitlines() or [""])[-1]
        return Outcome(case, rc, line, sorted(set(problems)))
    finally:
        if own:
            shutil.rmtree(sandbox, ignore_errors=True)


# ---- sandbox contents --------------------------------------------------------------------------------------

def user_files(name: str) -> Callable[[Path], None]:
    """A folder of someone's own files (what a slip of --out must never touch)."""
    def setup(d: Path) -> None:
        (d / name).mkdir(parents=True, exist_ok=True)
        (d / name / "thesis.txt").write_text("four years of work\n")
        (d / name / "photo.png").write_bytes(b"\x89PNG not really")
    return setup


def a_file(name: str, text: str = "keep me\n") -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    return setup


def raw_file(name: str, data: bytes) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    return setup


def both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        for s in setups:
            s(d)
    return setup


def prompts_md(*prompts: str, tag: str = "world") -> list[str]:
    from clvr.world.parser import parse

    return [json.dumps(dict(parse(p), tag=tag)) for p in prompts]


def metadata(name: str, lines: list[str]) -> Callable[[Path], None]:
    return raw_file(name, "".join(line + "\n" for line in lines).encode())


def suite(name: str, prompts: tuple[str, ...], owner: str = "world render-suite") -> Callable[[Path], None]:
    """A ground-truth suite as `clvr world render-suite` makes it (marker included)."""
    def setup(d: Path) -> None:
        from clvr.world.bench import render_suite

        render_suite([json.loads(x) for x in prompts_md(*prompts)], d / name, owner=owner)
    return setup


def plain_geneval(name: str, lines: list[str], samples: list[bytes]) -> Callable[[Path], None]:
    """A GenEval folder made by hand (no marker): one prompt folder per metadata line, the same sample files in each."""
    def setup(d: Path) -> None:
        for i, line in enumerate(lines):
            f = d / name / f"{i:05d}"
            (f / "samples").mkdir(parents=True)
            (f / "metadata.jsonl").write_text(line + "\n")
            for k, data in enumerate(samples):
                (f / "samples" / f"{k:04d}.png").write_bytes(data)
    return setup


_CKPT: dict[str, Path] = {}


def checkpoint(name: str, spoil: str = "") -> Callable[[Path], None]:
    """A copy of the shipped base weights, optionally spoilt: "nan" / "inf" weights, "truncated" file, "class"."""
    def setup(d: Path) -> None:
        from clvr.registry import WEIGHTS_DIR

        dest = d / name
        shutil.copytree(WEIGHTS_DIR / "base", dest)
        st = dest / "transformer" / "diffusion_pytorch_model.safetensors"
        if spoil in ("nan", "inf"):
            import torch
            from safetensors.torch import load_file, save_file

            key = f"{spoil}:{st}"
            if key not in _CKPT:
                tensors = load_file(st)
                value = float("nan") if spoil == "nan" else float("inf")
                tensors = {k: torch.full_like(v, value) if v.is_floating_point() else v for k, v in tensors.items()}
                cache = Path(tempfile.mkdtemp(prefix="clvr-ckpt-")) / st.name
                save_file(tensors, cache)
                _CKPT[key] = cache
            shutil.copy(_CKPT[key], st)
        elif spoil == "truncated":
            st.write_bytes(st.read_bytes()[:1000])
        elif spoil == "class":
            (dest / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return setup


# ---- completeness of named outputs --------------------------------------------------------------------------

def trace_done(out: str) -> Callable[[Path], bool]:
    def check(d: Path) -> bool:
        o = d / out
        try:
            json.loads((o / "trace.json").read_text())
        except (OSError, ValueError):
            return False
        return (o / "final.png").is_file() and (o / "filmstrip.png").is_file()
    return check


def suite_done(out: str, n: int | None = None) -> Callable[[Path], bool]:
    """Exactly the prompt folders of one suite (n of them when known), each with its metadata and samples."""
    def check(d: Path) -> bool:
        folders = sorted(p for p in (d / out).iterdir() if p.is_dir()) if (d / out).is_dir() else []
        if not folders or (n is not None and len(folders) != n):
            return False
        if [p.name for p in folders] != [f"{i:05d}" for i in range(len(folders))]:
            return False
        return all((p / "metadata.jsonl").is_file() and any((p / "samples").glob("*.png")) for p in folders)
    return check


def jsonl_done(out: str) -> Callable[[Path], bool]:
    def check(d: Path) -> bool:
        try:
            rows = [json.loads(x) for x in (d / out).read_text().splitlines()]
        except (OSError, ValueError):
            return False
        return bool(rows)
    return check


def nothing(_: Path) -> bool:
    return True


# ---- (a) the catalogue ------------------------------------------------------------------------------------------

GOOD = "a red circle above a blue square"


def gen(prompt: str, *extra: str, out: str = "gen") -> list[str]:
    return ["generate", prompt, "--model", "oracle", "--out", out, *extra]


def render(md: str, out: str = "suite", *extra: str) -> list[str]:
    return ["world", "render-suite", "--metadata", md, "--out", out, *extra]


GOOD_MD = metadata("m.jsonl", prompts_md(GOOD, "two green triangles"))
BAD_PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 40


def _catalogue() -> list[Case]:
    P, O, C, M, W, N = "prompt", "override", "checkpoint", "metadata", "path", "number"
    g, show = trace_done("gen"), ["config", "show"]
    return [
        # prompts (clvr generate, oracle generator)
        Case(P, "empty", gen(""), "error", "gen", needle="empty"),
        Case(P, "blank", gen("   \t "), "error", "gen", needle="empty"),
        Case(P, "too long", gen("a red circle " * 40), "error", "gen", needle="too long"),
        Case(P, "unknown colour", gen("a purple circle"), "error", "gen", needle="purple"),
        Case(P, "17 objects on 16 cells", gen("sixteen red circles and a blue square"), "error", "gen"),
        Case(P, "contradiction", gen("two circles and no circles"), "error", "gen", needle="2 circles"),
        Case(P, "escape code", gen("a red\x1b[31m circle"), "error", "gen", needle="\\x1b"),
        Case(P, "bidi override", gen("a red \u202ecircle"), "error", "gen", needle="\\u202e"),
        Case(P, "emoji", gen("a red circle \U0001f642"), "error", "gen"),
        Case(P, "accented", gen("a red círcle"), "error", "gen", needle="círcle"),
        Case(P, "sql", gen("a red circle'; DROP TABLE prompts; --"), "error", "gen"),
        Case(P, "punctuation only", gen("..."), "error", "gen"),
        Case(P, "dangling relation", gen("a red circle left of"), "error", "gen"),
        Case(P, "negative count", gen("-1 red circles"), "error", "gen"),
        Case(P, "option-like words", gen("a red circle --seed 5"), "error", "gen"),
        Case(P, "good", gen(GOOD), "ok", "gen", complete=g),
        Case(P, "newline inside", gen("a red circle\nand a blue square"), "ok", "gen", complete=g),
        Case(P, "tabs around", gen("\ta red circle\t"), "ok", "gen", complete=g),
        Case(P, "sixteen objects", gen("sixteen circles"), "ok", "gen", complete=g),
        # config overrides
        Case(O, "unclosed list", [*show, "pretrain.op_probs=[1,2"], "error", needle="pretrain.op_probs=[1,2"),
        Case(O, "yaml tag", [*show, "pretrain.steps=!!python/object/apply:os.system [ls]"], "error",
             needle="not valid YAML"),
        Case(O, "newline in value", [*show, "pretrain.steps=1\n2"], "error", needle="\\n"),
        Case(O, "unclosed quote", [*show, 'pretrain.out="runs/x'], "error", needle="pretrain.out"),
        Case(O, "batch_size 0", [*show, "pretrain.batch_size=0"], "error", needle="pretrain.batch_size"),
        Case(O, "steps -5", [*show, "pretrain.steps=-5"], "error", needle="pretrain.steps"),
        Case(O, "op_probs negative", [*show, "pretrain.op_probs=[5,-3]"], "error", needle="pretrain.op_probs"),
        Case(O, "max_iters -1", [*show, "loop.max_iters=-1"], "error", needle="loop.max_iters"),
        Case(O, "lr nan", [*show, "pretrain.lr=nan"], "error", needle="pretrain.lr"),
        Case(O, "lr negative", [*show, "distill.lr=-0.1"], "error", needle="distill.lr"),
        Case(O, "grid 1", [*show, "world.grid=1"], "error", needle="world.grid"),
        Case(O, "grid 1000", [*show, "world.grid=1000"], "error", needle="world.grid"),
        Case(O, "no tiers", [*show, "synthesize.tiers=[]"], "error", needle="synthesize.tiers"),
        Case(O, "workers 0", [*show, "synthesize.workers=0"], "error", needle="synthesize.workers"),
        Case(O, "ftp endpoint", [*show, "controller.base_url=ftp://host"], "error", needle="controller.base_url"),
        Case(O, "seed -1", [*show, "seed=-1"], "error", needle="seed"),
        Case(O, "eval count 0", [*show, "eval.n_per_tier=0"], "error", needle="eval.n_per_tier"),
        Case(O, "text_dropout 1", [*show, "pretrain.text_dropout=1"], "error", needle="pretrain.text_dropout"),
        Case(O, "heads do not divide", [*show, "generator.hidden=30", "generator.heads=4"], "error",
             needle="generator.hidden"),
        Case(O, "unknown section", [*show, "nosuch.key=1"], "error", needle="nosuch"),
        Case(O, "unknown key", [*show, "pretrain.nosuch=1"], "error", needle="nosuch"),
        Case(O, "wrong type", [*show, "pretrain.steps=abc"], "error", needle="pretrain.steps"),
        Case(O, "no equals sign", [*show, "pretrain.steps"], "error", needle="key=value"),
        Case(O, "unused section for generate", gen(GOOD, "--set", "sample.steps=-3"), "error", "gen",
             needle="sample"),
        Case(O, "unused top-level key for generate", gen(GOOD, "--set", "seed=3"), "error", "gen", needle="seed"),
        Case(O, "pretrain with steps -5", ["world", "pretrain", "--profile", "ci", "pretrain.steps=-5",
                                            "pretrain.out=pre"], "error", "pre", needle="pretrain.steps"),
        Case(O, "unknown profile", [*show, "--profile", "nosuch"], "error", needle="nosuch"),
        Case(O, "valid override", [*show, "pretrain.steps=10"], "ok", complete=nothing),
        # checkpoints (clvr generate --model X)
        Case(C, "misspelt name", gen(GOOD, "--model", "distiled"), "error", "gen", needle="distilled"),
        Case(C, "missing folder", gen(GOOD, "--model", "no/such/ckpt"), "error", "gen", needle="no/such/ckpt"),
        Case(C, "empty folder", gen(GOOD, "--model", "ck"), "error", "gen", setup=lambda d: (d / "ck").mkdir(),
             needle="model_index.json"),
        Case(C, "a file", gen(GOOD, "--model", "ck.txt"), "error", "gen", setup=a_file("ck.txt")),
        Case(C, "another pipeline class", gen(GOOD, "--model", "ck"), "error", "gen", setup=checkpoint("ck", "class"),
             needle="not a world generator"),
        Case(C, "all weights NaN", gen(GOOD, "--model", "ck"), "error", "gen", setup=checkpoint("ck", "nan"),
             needle="non-finite"),
        Case(C, "truncated weights", gen(GOOD, "--model", "ck"), "error", "gen", setup=checkpoint("ck", "truncated"),
             needle="ck"),
        Case(C, "blank name", gen(GOOD, "--model", " "), "error", "gen", needle="unknown model"),
        Case(C, "good copy of the base", ["generate", "a red circle", "--model", "ck", "--out", "gen"], "ok", "gen",
             setup=checkpoint("ck"), complete=g),
        # GenEval metadata and folders
        Case(M, "JSON array line", render("m.jsonl"), "error", "suite", metadata("m.jsonl", ["[1, 2]"]),
             needle="JSON array"),
        Case(M, "not UTF-8", render("m.jsonl"), "error", "suite", raw_file("m.jsonl", b"\xff\xfe{}\n"),
             needle="UTF-8"),
        Case(M, "metadata path is a folder", render("md"), "error", "suite", lambda d: (d / "md").mkdir(),
             needle="is a folder"),
        Case(M, "empty file", render("m.jsonl"), "error", "suite", raw_file("m.jsonl", b""), needle="no metadata"),
        Case(M, "malformed JSON", render("m.jsonl"), "error", "suite", metadata("m.jsonl", ['{"tag": ']),
             needle="m.jsonl:1"),
        Case(M, "no include", render("m.jsonl"), "error", "suite",
             metadata("m.jsonl", ['{"tag": "t", "prompt": "p"}']), needle="include"),
        Case(M, "count 0", render("m.jsonl"), "error", "suite", metadata(
            "m.jsonl", ['{"tag": "t", "prompt": "p", "include": [{"class": "circle", "count": 0}]}']), needle="count"),
        Case(M, "count as text", render("m.jsonl"), "error", "suite", metadata(
            "m.jsonl", ['{"tag": "t", "prompt": "p", "include": [{"class": "circle", "count": "2"}]}']),
             needle="count"),
        Case(M, "unknown clause field", render("m.jsonl"), "error", "suite", metadata(
            "m.jsonl", ['{"tag": "t", "prompt": "p", "include": [{"class": "circle", "count": 1, "size": 3}]}']),
             needle="size"),
        Case(M, "position points forward", render("m.jsonl"), "error", "suite", metadata(
            "m.jsonl", ['{"tag": "t", "prompt": "p", "include": [{"class": "circle", "count": 1, '
                        '"position": ["above", 0]}]}']), needle="position"),
        Case(M, "nested 100k deep", render("m.jsonl"), "error", "suite",
             raw_file("m.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n"), needle="m.jsonl:1"),
        Case(M, "class the world cannot draw", render("m.jsonl"), "error", "suite", metadata(
            "m.jsonl", ['{"tag": "t", "prompt": "a cow", "include": [{"class": "cow", "count": 1}]}'])),
        Case(M, "17 objects", render("m.jsonl"), "error", "suite", metadata(
            "m.jsonl", ['{"tag": "t", "prompt": "p", "include": [{"class": "circle", "count": 17}]}']),
             needle="line 1"),
        Case(M, "good suite", render("m.jsonl"), "ok", "suite", GOOD_MD, complete=suite_done("suite", 2)),
        Case(M, "over a larger earlier suite", render("m.jsonl"), "ok", "suite",
             both(GOOD_MD, suite("suite", ("a red circle", "a blue square", "two red circles", "a green circle"))),
             complete=suite_done("suite", 2)),
        Case(M, "over someone's GenEval folder", render("m.jsonl"), "error", "suite",
             both(GOOD_MD, plain_geneval("suite", prompts_md("a red circle"), [BAD_PNG])), needle="suite"),
        Case(M, "judge: 0 readable images", ["eval", "geneval", "g"], "error", "g/results.jsonl",
             plain_geneval("g", prompts_md("a red circle"), [BAD_PNG, b"GIF89a"]), needle="no image"),
        Case(M, "judge: no prompt folders", ["eval", "geneval", "g"], "error", "g/results.jsonl",
             lambda d: (d / "g").mkdir(), needle="no prompt folders"),
        Case(M, "judge: only unsupported classes", ["eval", "geneval", "g"], "error", "g/results.jsonl",
             plain_geneval("g", ['{"tag": "t", "prompt": "a cow", "include": [{"class": "cow", "count": 1}]}'],
                           [BAD_PNG]), needle="no image"),
        Case(M, "judge: results over the metadata", ["eval", "geneval", "s", "--out", "s/00000/metadata.jsonl"],
             "error", "s/00000/metadata.jsonl", suite("s", ("a red circle",)), needle="prompt folder"),
        Case(M, "judge: results over --metadata", ["eval", "geneval", "s", "--metadata", "m.jsonl", "--out",
                                                   "m.jsonl"], "error", "m.jsonl",
             both(GOOD_MD, suite("s", ("a red circle", "a blue square"))), needle="metadata file"),
        Case(M, "judge: --metadata is a folder", ["eval", "geneval", "s", "--metadata", "s"], "error",
             "s/results.jsonl", suite("s", ("a red circle",)), needle="is a folder"),
        Case(M, "judge: good suite", ["eval", "geneval", "s"], "ok", "s/results.jsonl",
             suite("s", ("a red circle", "two blue squares")), complete=jsonl_done("s/results.jsonl")),
        # output paths
        Case(W, "generate into a file", gen(GOOD, out="notes.txt"), "error", "notes.txt", a_file("notes.txt"),
             needle="is a file"),
        Case(W, "generate under a file", gen(GOOD, out="notes.txt/run"), "error", "notes.txt/run",
             a_file("notes.txt"), needle="is a file"),
        Case(W, "generate into the current folder", gen(GOOD, out="."), "error", "gen", a_file("notes.txt")),
        Case(W, "generate into someone's folder", gen(GOOD, out="mine"), "error", "mine", user_files("mine"),
             needle="mine"),
        Case(W, "generate over its own earlier output", gen(GOOD), "ok", "gen",
             lambda d: run_case(Case(W, "first", gen("two red circles and a blue square and a green triangle",
                                                     out=f"{d}/gen"), "ok"), d), complete=g),
        Case(W, "bench synthesize: someone's folder, missing model",
             ["bench", "synthesize", "--profile", "ci", "--out", "mine", "synthesize.model=no/such/model"], "error",
             "mine", user_files("mine"), needle="no generator checkpoint"),
        Case(W, "bench synthesize: someone's folder",
             ["bench", "synthesize", "--profile", "ci", "--out", "mine", "synthesize.generator=oracle"], "error",
             "mine", user_files("mine"), needle="mine"),
        Case(W, "bench synthesize: the current folder",
             ["bench", "synthesize", "--profile", "ci", "--out", ".", "synthesize.generator=oracle"], "error",
             "gen", a_file("notes.txt")),
        Case(W, "render-suite into a file", render("m.jsonl", "notes.txt"), "error", "notes.txt",
             both(GOOD_MD, a_file("notes.txt")), needle="is a file"),
        Case(W, "judge results under a file", ["eval", "geneval", "s", "--out", "notes.txt/r.jsonl"], "error",
             "notes.txt/r.jsonl", both(a_file("notes.txt"), suite("s", ("a red circle",))), needle="is a file"),
        Case(W, "judge results into a folder", ["eval", "geneval", "s", "--out", "s"], "error", "s/results.jsonl",
             suite("s", ("a red circle",)), needle="is a folder"),
        # numbers
        Case(N, "generate --seed -1", gen(GOOD, "--seed", "-1"), "error", "gen", needle="--seed"),
        Case(N, "generate --seed 10^23", gen(GOOD, "--seed", "99999999999999999999999"), "error", "gen",
             needle="--seed"),
        Case(N, "generate --seed abc", gen(GOOD, "--seed", "abc"), "error", "gen", needle="--seed"),
        Case(N, "render-suite --seed -1", render("m.jsonl", "suite", "--seed", "-1"), "error", "suite", GOOD_MD,
             needle="--seed"),
        Case(N, "world sample --seed -1", ["world", "sample", "--tier", "1", "--seed", "-1"], "error",
             needle="--seed"),
        Case(N, "world sample --seed 2^32-1", ["world", "sample", "--tier", "1", "--seed", str(MAX_SEED)], "ok",
             complete=nothing),
        Case(N, "judge --grid 0", ["eval", "geneval", "s", "--grid", "0"], "error", "s/results.jsonl",
             suite("s", ("a red circle",)), needle="--grid"),
        Case(N, "judge --grid -4", ["eval", "geneval", "s", "--grid", "-4"], "error", "s/results.jsonl",
             suite("s", ("a red circle",)), needle="--grid"),
        Case(N, "render-suite --samples 0", render("m.jsonl", "suite", "--samples", "0"), "error", "suite", GOOD_MD,
             needle="--samples"),
    ]


CATALOGUE = _catalogue()


# ---- (b) generated cases: hypothesis strategies -------------------------------------------------------------------

def strategies():
    """name -> (strategy of Case). Text never holds NUL or lone surrogates (an argv cannot)."""
    from hypothesis import strategies as st

    from clvr.config import Config, flat_params
    from clvr.world.vocab import words

    text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
    vocab = st.sampled_from([*words(), "photo", "purple", "cow", "-1", "17", "\x1b[2J", "\u202e", "\n", "'", '"'])
    prompt = st.one_of(text, st.lists(vocab, max_size=14).map(" ".join))
    keys = sorted(flat_params(Config()))
    value = st.one_of(st.integers(-10**6, 10**20).map(str), st.floats().map(str), text,
                      st.sampled_from(["[", "]", "{", "}", "[1,2", "!!binary x", "null", "~", "[0.5,0.5]", "''",
                                       "1e309", "-0", "true", "yes"]))
    override = st.one_of(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(keys), value),
                         st.builds(lambda k, v: f"{k}={v}", text, value), text)

    json_value = st.recursive(st.none() | st.booleans() | st.integers(-3, 20) | st.floats() | text,
                              lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text, kids, max_size=4),
                              max_leaves=12)
    clause = st.fixed_dictionaries({"class": st.sampled_from(["circle", "square", "triangle", "cow", ""]),
                                    "count": st.one_of(st.integers(-1, 20), st.just("2"), st.booleans())},
                                   optional={"color": st.sampled_from(["red", "blue", "purple", "", 3]),
                                             "position": st.one_of(
                                                 st.tuples(st.sampled_from(["above", "below", "inside"]),
                                                           st.integers(-1, 3)).map(list), json_value)})
    record = st.fixed_dictionaries({"tag": st.sampled_from(["world", "counting", ""]), "prompt": prompt,
                                    "include": st.lists(clause, max_size=4)},
                                   optional={"exclude": st.lists(clause, max_size=2), "tier": json_value})
    line = st.one_of(record.map(json.dumps), json_value.map(json.dumps), text)
    md_bytes = st.one_of(st.lists(line, min_size=1, max_size=4).map(lambda ls: "".join(x + "\n" for x in ls).encode()),
                         st.binary(max_size=200))

    def prompt_case(p: str) -> Case:
        return Case("prompt", "generated", gen(p), "any", "gen", complete=trace_done("gen"))

    def override_case(items: list[str]) -> Case:
        return Case("override", "generated", ["config", "show", *items], "any", complete=nothing)

    def generate_override_case(item: str) -> Case:
        return Case("override", "generated generate --set", gen(GOOD, "--set", item), "any", "gen",
                    complete=trace_done("gen"))

    def metadata_case(data: bytes) -> Case:
        return Case("metadata", "generated", render("m.jsonl"), "any", "suite", raw_file("m.jsonl", data),
                    complete=suite_done("suite"))

    def judge_case(lines: bytes, samples: list[bytes]) -> Case:
        def setup(d: Path) -> None:
            raw_file("m.jsonl", lines)(d)
            for i in range(2):
                for k, data in enumerate(samples):
                    (d / "g" / f"{i:05d}" / "samples").mkdir(parents=True, exist_ok=True)
                    (d / "g" / f"{i:05d}" / "samples" / f"{k:04d}.png").write_bytes(data)
        return Case("metadata", "generated judge", ["eval", "geneval", "g", "--metadata", "m.jsonl"], "any",
                    "g/results.jsonl", setup, jsonl_done("g/results.jsonl"))

    def seed_case(seed: int | str, where: str) -> Case:
        try:
            value = int(seed)  # what the CLI's integer option makes of a text: " 8", "+8", "8_000", "٣"
        except ValueError:
            value = -1
        expect = "ok" if 0 <= value <= MAX_SEED else "error"
        if where == "sample":
            return Case("number", "generated seed", ["world", "sample", "--tier", "2", "--n", "1", "--seed", str(seed)],
                        expect, complete=nothing)
        return Case("number", "generated seed", gen("a red circle", "--seed", str(seed)), expect, "gen",
                    complete=trace_done("gen"))

    def path_case(kind: str, name: str) -> Case:
        """--out of generate: a kind of existing thing there, or a generated name (any outcome, same contract)."""
        setups = {"file": a_file("x"), "user folder": user_files("x"), "under a file": a_file("x"),
                  "new": None, "own earlier output": lambda d: run_case(Case("path", "first", gen(GOOD, out=f"{d}/x"),
                                                                             "ok"), d),
                  "current folder": a_file("keep.txt")}
        if kind == "name":
            return Case("path", "generated name", gen("a red circle", out=name), "any", name or ".",
                        complete=trace_done(name or "."))
        out = {"under a file": "x/y", "current folder": "."}.get(kind, "x")
        expect = "ok" if kind in ("new", "own earlier output") else "error"
        return Case("path", f"generated {kind}", gen("a red circle", out=out), expect,
                    "x" if kind != "current folder" else "gen", setups[kind], trace_done(out))

    safe_name = text.filter(lambda s: s.strip() not in ("", ".", "..") and "/" not in s and len(s.encode()) < 200)
    return {
        "prompt": prompt.map(prompt_case),
        "override": st.lists(override, min_size=1, max_size=3).map(override_case),
        "generate_override": override.map(generate_override_case),
        "metadata": md_bytes.map(metadata_case),
        "judge": st.builds(judge_case, md_bytes, st.lists(st.one_of(st.binary(max_size=64), st.just(BAD_PNG)),
                                                          max_size=2)),
        "seed": st.builds(seed_case, st.one_of(st.integers(-2**80, 2**80), st.integers(0, MAX_SEED), text),
                          st.sampled_from(["sample", "generate"])),
        "path": st.one_of(st.builds(path_case, st.sampled_from(["file", "user folder", "under a file", "new",
                                                                "own earlier output", "current folder"]),
                                    st.just("")),
                          st.builds(path_case, st.just("name"), safe_name)),
    }


def run_generated(n_per_strategy: int, seed: int = 0) -> list[Outcome]:
    """`n_per_strategy` generated cases from each strategy (hypothesis, derandomized), every outcome kept."""
    from hypothesis import HealthCheck, given, settings

    outcomes: list[Outcome] = []
    for name, strat in strategies().items():
        @settings(max_examples=n_per_strategy, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=("generate",))
        @given(strat)
        def collect(case: Case) -> None:
            outcomes.append(run_case(case))
        collect()
    return outcomes


# ---- report ----------------------------------------------------------------------------------------------------

PROBLEMS = ("traceback", "garbage_accepted", "data_loss", "stray_writes", "incomplete", "good_rejected",
            "weak_message")


def tally(outcomes: list[Outcome]) -> dict:
    counts = Counter(p.split("_")[0] == "exit" and "traceback" or p for o in outcomes for p in o.problems)
    fam: dict = defaultdict(lambda: {"cases": 0, "failed": 0})
    for o in outcomes:
        fam[o.case.family]["cases"] += 1
        fam[o.case.family]["failed"] += not o.ok
    return {"counts": {k: counts.get(k, 0) for k in PROBLEMS}, "by_family": dict(fam)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generated", type=int, default=600, help="generated cases in all (spread over 7 strategies)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cat = [run_case(c) for c in CATALOGUE]
    t1 = time.perf_counter()
    per = max(1, -(-args.generated // len(strategies())))
    gen_out = run_generated(per)
    t2 = time.perf_counter()
    for o in cat + gen_out:
        if not o.ok:
            print(f"FAIL [{o.case.family}] {o.case.name}: {o.problems} rc={o.rc} args={o.case.args!r} -> {o.err}")
    c, g = tally(cat), tally(gen_out)
    total = {k: c["counts"][k] + g["counts"][k] for k in PROBLEMS}
    fams = sorted(set(c["by_family"]) | set(g["by_family"]))
    by_family = {f: {"catalogue": c["by_family"].get(f, {"cases": 0, "failed": 0}),
                     "generated": g["by_family"].get(f, {"cases": 0, "failed": 0})} for f in fams}
    print(json.dumps({"cases": len(cat), "generated": len(gen_out), "tracebacks": total["traceback"],
                      "garbage_accepted": total["garbage_accepted"], "data_loss": total["data_loss"],
                      "stray_writes": total["stray_writes"], "incomplete": total["incomplete"],
                      "good_rejected": total["good_rejected"], "weak_messages": total["weak_message"],
                      "exit_codes": dict(sorted(Counter(str(o.rc) for o in cat + gen_out).items())),
                      "catalogue_s": round(t1 - t0, 1), "generated_s": round(t2 - t1, 1), "by_family": by_family}))


if __name__ == "__main__":
    main()
