"""`clvr generate --metadata FILE --outdir DIR`: GenEval's folder layout for every prompt, resumable, scored by
`clvr eval geneval DIR`; real GenEval prompts in single mode; prompts the controller cannot plan."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clvr.io import load_png
from clvr.judge import GENEVAL_METADATA, read_jsonl
from clvr.probe import GENEVAL_TAGS
from clvr.world.grammar import geneval_suite

from conftest import clvr

def world_metadata(path: Path, per_tag: int = 1, seed: int = 5) -> list[dict]:
    """GenEval-format metadata in world vocabulary (what `clvr eval geneval-world` draws), written to `path`."""
    rows = []
    for k, tag in enumerate(GENEVAL_TAGS):
        rows += [dict(md, tag=md.get("tag", tag)) for md in geneval_suite(tag, per_tag, np.random.default_rng([seed, k]))]
    write(path, rows)
    return rows


def real_metadata(path: Path) -> list[dict]:
    """The first real GenEval prompt of each tag (benchmarks/geneval/, the repository's copy)."""
    lines = read_jsonl(GENEVAL_METADATA)
    rows = [next(r for r in lines if r["tag"] == t) for t in GENEVAL_TAGS]
    write(path, rows)
    return rows


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


def batch(monkeypatch, capsys, md: Path, out: Path, *args: str) -> tuple[int, dict | None, str]:
    code, stdout, err = clvr(monkeypatch, capsys, "generate", "--metadata", str(md), "--outdir", str(out),
                             "--profile", "ci", *args)
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    return code, json.loads(last) if last.startswith("{") else None, err


def test_world_round_trip_resume_and_refusals(monkeypatch, capsys, tmp_path):
    md, out = tmp_path / "world.jsonl", tmp_path / "out"
    rows = world_metadata(md)
    code, res, err = batch(monkeypatch, capsys, md, out, "--model", "oracle", "--samples", "2")
    assert code == 0, err
    assert res["generated"] == len(rows) and res["kept"] == 0 and res["skipped"] == 0 and res["samples"] == 2
    for i, r in enumerate(rows):  # GenEval's layout
        d = out / f"{i:05d}"
        assert [json.loads(l) for l in (d / "metadata.jsonl").read_text().splitlines()] == [r]
        assert sorted(p.name for p in (d / "samples").iterdir()) == ["0000.png", "0001.png"]
        rec = json.loads((d / "generation.json").read_text())
        assert rec["settings"]["mode"] == "loop" and [s["seed"] for s in rec["samples"]] == [2 * i, 2 * i + 1]
    assert not (out / f"{len(rows):05d}").exists()

    code, stdout, err = clvr(monkeypatch, capsys, "eval", "geneval", str(out))  # the round trip
    assert code == 0, err
    score = json.loads(stdout.strip().splitlines()[-1])
    assert score["images"] == 2 * len(rows) and score["overall"] == 1.0 and set(score["per_tag"]) == set(GENEVAL_TAGS)

    # resume: a complete folder is kept untouched; a missing one and a killed run's leftovers are redone
    before = files(out)
    gone = out / "00002"
    kept_png = load_png(gone / "samples" / "0001.png")
    os.rename(gone, out / ".tmp-00002-99999")  # as a killed run leaves its unfinished folder
    code, res, err = batch(monkeypatch, capsys, md, out, "--model", "oracle", "--samples", "2")
    assert code == 0, err
    assert res["kept"] == len(rows) - 1 and res["generated"] == 1
    after = files(out)
    assert {k: v for k, v in after.items() if not k.startswith(("00002", "results"))} == \
        {k: v for k, v in before.items() if not k.startswith(("00002", "results"))}
    assert np.array_equal(load_png(gone / "samples" / "0001.png"), kept_png)  # same seed, same sample
    assert not list(out.glob(".tmp-*"))
    code, res, err = batch(monkeypatch, capsys, md, out, "--model", "oracle", "--samples", "2")
    assert code == 0 and res["generated"] == 0 and res["kept"] == len(rows) and files(out) == after

    # never overwritten: other settings, another metadata file, a folder not made by this command
    for args, needle in ((["--model", "oracle", "--samples", "2", "--mode", "single"], "mode 'loop'"),
                         (["--model", "oracle", "--samples", "1"], "samples 2"),
                         (["--model", "noisy-oracle", "--samples", "2"], "model 'oracle'")):
        code, res, err = batch(monkeypatch, capsys, md, out, *args)
        assert code == 2 and needle in err and "new --outdir" in err and len(err.strip().splitlines()) == 1
    other = tmp_path / "other.jsonl"
    world_metadata(other, seed=6)
    code, _, err = batch(monkeypatch, capsys, other, out, "--model", "oracle", "--samples", "2")
    assert code == 2 and "another metadata file" in err
    write(other, rows[:3])
    code, _, err = batch(monkeypatch, capsys, other, out, "--model", "oracle", "--samples", "2")
    assert code == 2 and "beyond the 3 prompts" in err
    assert files(out) == after
    (out / "00001" / "metadata.jsonl").rename(out / "00001" / "notes.jsonl")  # a folder this command did not write
    code, _, err = batch(monkeypatch, capsys, md, out, "--model", "oracle", "--samples", "2")
    assert code == 2 and "00001 has no metadata.jsonl" in err and (out / "00001" / "notes.jsonl").is_file()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_text("x")
    code, _, err = batch(monkeypatch, capsys, md, foreign, "--model", "oracle")
    assert code == 2 and "not empty" in err and (foreign / "cat.jpg").read_text() == "x"


def test_a_killed_batch_resumes_where_it_stopped(monkeypatch, capsys, tmp_path):
    """Killed in its third round of loops: the prompts of the first two rounds are on disk, complete, and the
    rerun does only the rest; the result equals an uninterrupted run's."""
    import clvr.loop.batch as batch_mod

    md = tmp_path / "world.jsonl"
    rows = world_metadata(md)
    real_run_many, rounds = batch_mod.run_many, []

    def dying(*a, **kw):
        rounds.append(len(a[0]))
        if len(rounds) == 3:
            raise KeyboardInterrupt
        return real_run_many(*a, **kw)

    monkeypatch.setattr(batch_mod, "run_many", dying)
    code, res, err = batch(monkeypatch, capsys, md, tmp_path / "out", "--model", "oracle", "--set", "eval.batch_size=2")
    assert code != 0 and res is None and len(rounds) == 3  # the CLI reports the interrupt (click: "Aborted!")
    done = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.isdigit())
    assert done == ["00000", "00001", "00002", "00003"] and not list((tmp_path / "out").glob(".tmp-*"))
    monkeypatch.setattr(batch_mod, "run_many", real_run_many)
    code, res, err = batch(monkeypatch, capsys, md, tmp_path / "out", "--model", "oracle", "--set", "eval.batch_size=2")
    assert code == 0 and res["kept"] == 4 and res["generated"] == len(rows) - 4
    code, res, err = batch(monkeypatch, capsys, md, tmp_path / "whole", "--model", "oracle")
    assert code == 0
    for i in range(len(rows)):
        a, b = (tmp_path / d / f"{i:05d}" / "samples" / "0000.png" for d in ("out", "whole"))
        assert np.array_equal(load_png(a), load_png(b))


def test_real_geneval_prompts_single_mode_and_unplannable_loop_prompts(monkeypatch, capsys, tmp_path):
    real, mixed = tmp_path / "real.jsonl", tmp_path / "mixed.jsonl"
    rows = real_metadata(real)
    # single mode: nothing parsed, every prompt drawn by the shipped world generator; the world detector cannot
    # score the real classes (eval geneval says so, exit 2)
    code, res, err = batch(monkeypatch, capsys, real, tmp_path / "single", "--mode", "single", "--model", "distilled")
    assert code == 0, err
    assert res["generated"] == len(rows) and res["skipped"] == 0
    assert all((tmp_path / "single" / f"{i:05d}" / "samples" / "0000.png").is_file() for i in range(len(rows)))
    code, stdout, err = clvr(monkeypatch, capsys, "eval", "geneval", str(tmp_path / "single"))
    assert code == 2 and f"{len(rows)} unsupported" in err and "the world detector does not know" in err

    # loop mode: the world controller cannot plan "a photo of a bench": skipped with a reason, the rest made
    world = world_metadata(tmp_path / "w.jsonl")[:2]
    write(mixed, [world[0], rows[0], world[1], rows[1]])
    out = tmp_path / "loop"
    code, res, err = batch(monkeypatch, capsys, mixed, out, "--model", "oracle")
    assert code == 1 and res["skipped"] == 2 and res["generated"] == 2 and res["skipped_folders"] == ["00001", "00003"]
    assert "2 prompt(s) skipped" in err and "Traceback" not in err
    why = (out / "00001" / "skipped.txt").read_text()
    assert "controller 'world' cannot plan this prompt in mode loop" in why and "bench" in why
    assert not (out / "00001" / "samples").exists() and (out / "00002" / "samples" / "0000.png").is_file()
    code, stdout, err = clvr(monkeypatch, capsys, "eval", "geneval", str(out))
    score = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and score["images"] == 2 and score["unsupported"] + score["missing"] == 2  # no samples, unscored

    # nothing plannable: refused before the generator loads, nothing written
    code, res, err = batch(monkeypatch, capsys, real, tmp_path / "none", "--mode", "rewrite", "--model", "oracle")
    assert code == 2 and "none of the" in err and "--mode single" in err and not (tmp_path / "none").exists()


@pytest.mark.parametrize("args, needle", [
    (["a red circle", "--metadata", "m.jsonl", "--outdir", "o"], "not both"),
    (["--metadata", "m.jsonl"], "both --metadata FILE and --outdir DIR"),
    (["--outdir", "o"], "both --metadata FILE and --outdir DIR"),
    (["--metadata", "m.jsonl", "--outdir", "o", "--out", "x"], "not both"),
    (["a red circle", "--samples", "2"], "--samples is for a batch"),
    ([], "give a PROMPT"),
    (["--metadata", "missing.jsonl", "--outdir", "o"], "metadata file not found"),
    (["--metadata", "bad.jsonl", "--outdir", "o"], "bad.jsonl:2: malformed JSON"),
    (["--metadata", "m.jsonl", "--outdir", "o", "--mode", "wander"], "unknown mode"),
])
def test_bad_batch_input_exits_2_with_one_line(monkeypatch, capsys, tmp_path, args, needle):
    monkeypatch.chdir(tmp_path)
    first = read_jsonl(GENEVAL_METADATA)[0]
    write(tmp_path / "m.jsonl", [first])
    (tmp_path / "bad.jsonl").write_text(json.dumps(first) + "\n{oops\n")
    code, out, err = clvr(monkeypatch, capsys, "generate", *args, "--model", "oracle", "--profile", "ci")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
