"""The learned controller's SFT (`clvr world controller-sft`, the `controller_sft` stage): state -> the teacher's step.

Data. Every decision of every data-engine trajectory (`clvr.learned.decisions.decision_states`: the exact state
the data engine's controller was handed, rejected outputs and the final stop included) is asked again of the
teacher (the budget-aware symbolic `WorldController` with the per-k success table `k_success`) at each calls-left
budget in `budgets` (0 = unbounded): one state is a different question with 1 call left than with 4. Each
(`state_text`, step) pair is one example, deduplicated; the loss is next-token cross-entropy on the step's
lexemes (and its end) only (`clvr.learned.tokens.encode_example`). Trajectories of held-out compositions
(`clvr.world.grammar.held_out`: the structures the held-out split tests) are never used; `eval_frac` of the
others (chosen by a hash of their id, so a bigger data set keeps the same ones) give the eval examples.

Training runs on the engine every trainer uses (clvr.train.engine: DeepSpeed, resumable `checkpoints/step-N/`,
the pipeline logs each one to MLflow); global step s is the length group (`length_groups`: examples of about one
length, so little compute goes to padding) that `default_rng([seed, s])` draws, so a resume needs no RNG state. Modes (`mode`): full (every weight), or lora: a peft LoRA on the Qwen3 attention and
MLP projections (`LORA_TARGETS`), saved merged, with the adapter in `adapter/` beside it (as clvr.train.sft). A
model folder (checkpoint `model/`, `final/`) is a controller folder (`clvr.learned.model.load_controller`).

Model class (`model_class`): causal_lm (above), or vlm: a Qwen3-VL that also reads the canvas image, the real-scale
path (clvr.learned.vlm.VLMTrainer overrides the methods marked "[vlm hook]"; no DAgger).

Eval: exact match of greedy constrained decoding against the teacher's step. Greedy decoding reproduces the
label exactly when, at every position of the label, the label's lexeme is the arg-max of the logits over the
lexemes the grammar allows there (`StepParse`); so it is measured in one teacher-forced forward pass per batch.

DAgger (`dagger_rounds`): after the first `steps`, each round runs the student in the loop (the `noisy-oracle`
generator, the world verifier) on `dagger_prompts` training-split prompts sampled afresh (the same ones each round),
at each budget; the states it reaches are labelled by the teacher at every budget and added to the pool
(`rounds/round-N.jsonl`, so a resumed run trains on the same data), then `dagger_steps` (0 = `steps`) more steps
follow, each phase with its own warm-up and decay.
Exact match before and after each round, and the student's own exact match and pass rate on the round's states,
go into metrics.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clvr.config import Config, to_dict
from clvr.errors import ClvrError
from clvr.io import atomic_dir, atomic_write_text
from clvr.learned.decisions import decision_states, teacher_labels
from clvr.learned.grammar import Lexicon, StepParse, best_allowed
from clvr.learned import tokens as T
from clvr.learned.model import build_model, load_controller, save_controller
from clvr.learned.state import state_text
from clvr.learned.tokens import MARK, build_tokenizer, encode_example, step_lexemes
from clvr.loop.controller import WorldController, load_k_success
from clvr.loop.roles import LoopState
from clvr.train import ckpt, engine as eng_mod
from clvr.train.engine import Engine
from clvr.train.loop import claim_run_dir, lr_at
from clvr.world.scene import Scene

ADAPTER = "adapter"  # the peft adapter's folder inside a LoRA run's model folders
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUNDS = "rounds"
MAX_POSITIONS = 1024
EVAL_BATCH = 64


@dataclass(frozen=True)
class Decision:
    """One training example: a state's text and the teacher's step, tokenized; the scene for the grammar."""

    text: str
    step: str  # the step's compact JSON (sorted keys)
    scene: Scene
    budget: int  # calls left (0 = unbounded)
    ids: tuple[int, ...]
    labels: tuple[int, ...]
    # [vlm hook] the state's canvas image (LoopState.canvas, uint8 HxWx3), for model_class vlm (clvr.learned.vlm)
    canvas: np.ndarray | None = field(default=None, compare=False, repr=False)


def label_examples(states: list[LoopState], teacher: WorldController, budgets: tuple[int, ...], tokenizer,
                   seen: set[tuple[str, str]] | None = None) -> list[Decision]:
    """The teacher's step for every state at every budget, as examples; a (text, step) pair already in `seen`
    is skipped (and `seen` gets the new ones)."""
    seen = set() if seen is None else seen
    new = []
    for n, (q, step) in enumerate(teacher_labels(states, teacher, budgets)):
        text, key = state_text(q), json.dumps(step, sort_keys=True)
        if (text, key) not in seen:
            seen.add((text, key))
            new.append((text, key, step, q.scene, budgets[n % len(budgets)], q.canvas))
    out = []
    for (text, key, step, scene, b, canvas), (ids, labels) in zip(new, encode_examples(tokenizer, [(x[0], x[2]) for x in new])):
        if len(ids) > MAX_POSITIONS:
            raise ClvrError(f"a state of '{text[:60]}...' is {len(ids)} tokens, over the model's {MAX_POSITIONS}")
        out.append(Decision(text, key, scene, b, tuple(ids), tuple(labels), canvas))
    return out


def encode_examples(tokenizer, pairs: list[tuple[str, dict]]) -> list[tuple[list[int], list[int]]]:
    """`encode_example` of many (state text, step) pairs. A text of words separated by single spaces (what
    `state_text` writes) is looked up word by word in the vocabulary: the Metaspace pre-tokenizer gives exactly
    "▁" + word per word there, and calling the tokenizer once per example was 2/3 of the stage's data time. Any
    other text, or an unknown word, goes through `encode_example` itself (which names unknown words)."""
    vocab, unk = tokenizer.get_vocab(), tokenizer.unk_token_id
    out = []
    for text, step in pairs:
        ids = [vocab.get(MARK + w, unk) for w in text.split(" ")]
        if unk in ids or not text or text != text.strip() or any(c in text for c in "\t\n\r\f\v"):
            out.append(encode_example(tokenizer, text, step))
            continue
        prompt = [tokenizer.bos_token_id, *ids]
        target = [*(vocab[x] for x in step_lexemes(step)), tokenizer.eos_token_id]
        out.append((prompt + target, [-100] * len(prompt) + target))
    return out


def _held_for_eval(tid: str, frac: float) -> bool:
    h = int(hashlib.sha256(tid.encode()).hexdigest()[:8], 16)
    return h / 2**32 < frac


def load_data(cfg: Config, teacher: WorldController, tokenizer, log,
              states=decision_states) -> tuple[list[Decision], list[Decision], dict[str, float], list[int]]:
    """(train examples, eval examples, stats, the data set's tiers) of `controller_sft.data`; `states(traj, grid)`
    gives a trajectory's decision states ([vlm hook]: clvr.learned.vlm's carry the canvas)."""
    from clvr.trajectories import load_trajectories
    from clvr.world.grammar import held_out

    s = cfg.controller_sft
    budgets = tuple(s.budgets)
    trajs = list(load_trajectories(s.data))
    if not trajs:
        raise ClvrError(f"controller_sft.data '{s.data}' holds no trajectories")
    use = [t for t in trajs if not held_out(t.metadata)]
    if not use:
        raise ClvrError(f"controller_sft.data '{s.data}': every trajectory is of a held-out composition")
    grid = cfg.world.grid
    for t in use:
        if t.grid != grid:
            raise ClvrError(f"controller_sft.data '{s.data}': trajectory {t.id} is on a {t.grid}x{t.grid} grid; "
                            f"world.grid is {grid}")
    ev_t = [t for t in use if _held_for_eval(t.id, s.eval_frac)]
    tr_t = [t for t in use if not _held_for_eval(t.id, s.eval_frac)]
    seen: set[tuple[str, str]] = set()
    train = label_examples([st for t in tr_t for st in states(t, grid)], teacher, budgets, tokenizer, seen)
    evals = label_examples([st for t in ev_t for st in states(t, grid)], teacher, budgets, tokenizer, seen)
    if not train:
        raise ClvrError(f"controller_sft.data '{s.data}' gives no training example")
    rng = np.random.default_rng([s.seed, 1])
    if len(evals) > s.eval_max:
        evals = [evals[i] for i in sorted(rng.choice(len(evals), s.eval_max, replace=False))]
    stats = {"trajectories": float(len(trajs)), "held_out_trajectories": float(len(trajs) - len(use)),
             "train_trajectories": float(len(tr_t)), "eval_trajectories": float(len(ev_t)),
             "train_examples": float(len(train)), "eval_examples": float(len(evals))}
    log(f"[controller_sft] {len(trajs)} trajectories ({len(trajs) - len(use)} of held-out compositions left out): "
        f"{len(train)} training and {len(evals)} eval examples at budgets {list(budgets)}")
    return train, evals, stats, sorted({t.tier for t in use})


def balance(pool: list[Decision], min_share: float) -> list[Decision]:
    """The pool with the examples of each kind of step (its op: add, remove, recolor, move, edit, stop) repeated
    until the kind is at least `min_share` of the original pool's size: corrections (remove, move, recolor) are a
    few per cent of the teacher's steps, and a student that only ever adds never clears a stray object."""
    if min_share <= 0 or not pool:
        return pool
    kinds: dict[str, list[Decision]] = {}
    for d in pool:
        kinds.setdefault(json.loads(d.step)["op"], []).append(d)
    out = list(pool)
    for group in kinds.values():
        reps = -(-int(min_share * len(pool)) // len(group)) - 1
        out += group * max(reps, 0)
    return out


def length_groups(pool: list[Decision], batch: int, seed: int) -> list[list[int]]:
    """The pool cut into global batches of examples of about the same length (shortest first; a seeded random
    order among equal lengths): padding to the longest row of a random batch wasted a third of the compute. A
    pool smaller than one batch is one group, repeated to size."""
    key = np.random.default_rng([seed, 2]).random(len(pool))
    order = sorted(range(len(pool)), key=lambda i: (len(pool[i].ids), key[i]))
    if len(order) < batch:
        return [[order[i % len(order)] for i in range(batch)]]
    return [order[i: i + batch] for i in range(0, len(order) - batch + 1, batch)]


def collate(batch: list[Decision], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on the state and on padding)."""
    n = max(len(d.ids) for d in batch)
    ids = torch.full((len(batch), n), pad, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, d in enumerate(batch):
        ids[i, : len(d.ids)] = torch.tensor(d.ids)
        labels[i, : len(d.labels)] = torch.tensor(d.labels)
        mask[i, : len(d.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.inference_mode()
def exact_match(model, lex: Lexicon, examples: list[Decision], pad: int, collate_fn=None) -> dict[str, float]:
    """Share of examples whose greedy constrained decoding gives exactly the teacher's step (module docstring),
    overall and per budget (`exact_match_b<b>`, b = 0 unbounded). `collate_fn(examples)` makes the model's inputs
    ([vlm hook]; default `collate`)."""
    if not examples:
        return {}
    was = model.training
    model.eval()
    hits: dict[int, list[bool]] = {}
    for i in range(0, len(examples), EVAL_BATCH):
        batch = examples[i: i + EVAL_BATCH]
        b = collate_fn(batch) if collate_fn else collate(batch, pad)
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        for row, d in enumerate(batch):
            start = d.labels.index(next(x for x in d.labels if x != -100))
            parse, ok = StepParse(lex, d.scene), True
            for pos in range(start, len(d.ids) - 1):  # the label's lexemes; its last token is [EOS]
                if best_allowed(logits[row, pos - 1], parse.allowed()) != d.ids[pos]:
                    ok = False
                    break
                parse.feed(d.ids[pos])
            hits.setdefault(d.budget, []).append(ok)
    model.train(was)
    flat = [h for v in hits.values() for h in v]
    return {"exact_match": float(np.mean(flat)), **{f"exact_match_b{k}": float(np.mean(v)) for k, v in sorted(hits.items())}}


def lexeme_parts(lexeme: str) -> tuple[list[str], tuple[str, str] | None]:
    """The words an output lexeme is made of (op, shape, colours, "to") and its cell digits (row, column) if it
    names a cell."""
    words = re.findall(r'"(?:op|shape|color|new_color)":"(\w+)"', lexeme)
    words += ["to"] * ('"to":' in lexeme)
    cell = re.search(r"\[(\d+),(\d+)\]", lexeme)
    return words, (cell.group(1), cell.group(2)) if cell else None


@torch.no_grad()
def compose_embeddings(model, tokenizer, grid: int, seed: int = 0) -> int:
    """Start each output lexeme's embedding (tied: also its output row) as the sum of the embeddings of the input
    words it is made of, plus its own random init: `{"op":"add","shape":"circle","color":"red","cell":` = add +
    circle + red; a cell `[r,c]` = digit r + Q digit c (Q a fixed random rotation, so [0,1] and [1,0] differ).
    Choosing a step is then mostly copying words of the state (the missing object's colour and shape, its cell)
    to the output, which attention does from the start; from a random init the copy took most of the budget.
    Returns the number of lexemes set."""
    emb = model.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(emb.shape[1], emb.shape[1], generator=g))
    n = 0
    for lexeme in T.output_lexemes(grid):
        words, cell = lexeme_parts(lexeme)
        rows = [emb[vocab[T.MARK + w]] for w in words if T.MARK + w in vocab]  # "edit" is no input word
        if cell:
            rows += [emb[vocab[T.MARK + cell[0]]], q @ emb[vocab[T.MARK + cell[1]]]]
        if rows:
            emb[vocab[lexeme]] += torch.stack(rows).sum(0)
            n += 1
    return n


def add_lora(model, rank: int, alpha: float, seed: int = 0):
    """Wrap the model with a peft LoRA on its attention and MLP projections -> the PeftModel (the base frozen)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS),
                     task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, cfg)


class ControllerTrainer:
    """One controller SFT run on the engine; resumes from the newest checkpoint in `out`."""

    def __init__(self, cfg: Config, out: Path, log=print):
        s = self.s = cfg.controller_sft
        self.cfg, self.out, self.log, self.t_start = cfg, out, log, time.perf_counter()
        if s.dagger_rounds and cfg.engine.zero_stage == 3:
            raise ClvrError("controller_sft.dagger_rounds needs engine.zero_stage < 3 (rank 0 runs the student whole)")
        claim_run_dir(out, "controller sft", "controller_sft.out")
        self.grid = cfg.world.grid
        self.teacher = WorldController(self.grid, cfg.loop.retries_per_step,
                                       k_success=load_k_success(s.k_success, "controller_sft.k_success"))
        self.tokenizer = self.make_tokenizer()
        self.pad = self.tokenizer.pad_token_id
        self.lex = self.make_lexicon()
        self.train, self.evals, self.stats, self.tiers = self.load_data(log)
        self.seen = {(d.text, d.step) for d in (*self.train, *self.evals)}
        self.step = 0
        if eng_mod.init_dist(eng_mod.pick_device(cfg.engine.precision))[1] > 1:
            eng_mod.dist.barrier()
        resume = eng_mod.latest(out)
        self.model = self.build()
        self.peft = add_lora(self.model, s.lora_rank, s.lora_alpha, s.seed) if s.mode == "lora" else None
        self.engine = Engine({"model": self.live}, cfg.engine, s.batch_size, s.lr, s.weight_decay)
        if resume is not None:
            self.step = self.engine.load(resume)["step"]
            log(f"[controller_sft] resumed from {resume} (step {self.step})")
        self.rounds: dict[int, list[Decision]] = {}
        self.live.train()

    # ---- [vlm hook] what clvr.learned.vlm.VLMTrainer (model_class vlm) overrides ----------------------------------

    def make_tokenizer(self):
        return build_tokenizer(self.grid)

    def make_lexicon(self) -> Lexicon | None:
        return Lexicon(self.tokenizer, self.grid)

    def load_data(self, log):
        return load_data(self.cfg, self.teacher, self.tokenizer, log)

    def batch(self, rows: list[Decision]) -> dict[str, torch.Tensor]:
        return collate(rows, self.pad)

    def measure(self, model, examples: list[Decision]) -> dict[str, float]:
        return exact_match(model, self.lex, examples, self.pad)

    def reload(self, folder: Path):
        return load_controller(folder, self.grid)[0]

    # ---- model -------------------------------------------------------------------------------------------------

    def build(self):
        s = self.s
        if s.init:
            model, _ = load_controller(s.init, self.grid)
            return model
        model = build_model(len(self.tokenizer), s.layers, s.hidden, s.heads, s.kv_heads, s.intermediate,
                            MAX_POSITIONS, s.seed)
        if s.compose_init:
            compose_embeddings(model, self.tokenizer, self.grid, s.seed)
        return model

    @property
    def live(self):
        return self.peft or self.model

    def plain(self):
        """The model without LoRA wrappers: a merged copy in lora mode, else the live model."""
        return copy.deepcopy(self.peft).merge_and_unload() if self.peft is not None else self.model

    def save_model(self, d: Path) -> None:
        save_controller(self.plain(), self.tokenizer, d, self.grid, {"mode": self.s.mode})
        if self.peft is not None:
            self.peft.save_pretrained(Path(d) / ADAPTER)

    # ---- data ----------------------------------------------------------------------------------------------

    def pool(self, phase: int) -> list[Decision]:
        """The training examples of phase `phase` (0 = the data set's; r = also DAgger rounds 1..r), balanced."""
        return balance([*self.train, *(d for r in range(1, phase + 1) for d in self.rounds[r])], self.s.min_share)

    def rows(self, step: int, groups: list[list[int]], pool: list[Decision]) -> list[Decision]:
        """This rank's share of global batch `step`: one of the length groups (`length_groups`), drawn by
        `default_rng([seed, step])`."""
        e = self.engine
        g = groups[int(np.random.default_rng([self.s.seed, step]).integers(len(groups)))]
        return [pool[i] for i in g[e.rank * e.micro_batch: (e.rank + 1) * e.micro_batch]]

    def round_data(self, r: int) -> list[Decision]:
        """DAgger round r's new examples: read from rounds/round-r.jsonl, or collected now (rank 0) and written."""
        path = self.out / ROUNDS / f"round-{r}.jsonl"
        if not path.is_file() and self.engine.is_main:
            found, metrics = self.collect(r)
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [json.dumps({"text": d.text, "step": d.step, "scene": d.scene.to_list(), "budget": d.budget})
                     for d in found]
            atomic_write_text(path, "".join(x + "\n" for x in lines))
            atomic_write_text(path.with_suffix(".metrics.json"), json.dumps(metrics))
        self.engine.barrier()
        out = []
        for line in path.read_text().splitlines():
            d = json.loads(line)
            step = json.loads(d["step"])
            ids, labels = encode_example(self.tokenizer, d["text"], step)
            out.append(Decision(d["text"], d["step"], Scene.from_list(d["scene"], self.grid), d["budget"],
                                tuple(ids), tuple(labels)))
        return out

    def collect(self, r: int) -> tuple[list[Decision], dict]:
        """Run the student on `dagger_prompts` training-split prompts sampled afresh (the same ones every round, so
        rounds compare), at each budget in `budgets`; label the states it reaches at every budget. Returns the pairs
        not seen before and the round's metrics."""
        from clvr.generator import make_generator
        from clvr.learned.controller import LearnedController
        from clvr.learned.decisions import RecordingController
        from clvr.loop.run import build_verifier, run_many
        from clvr.world.grammar import held_out, sample_prompt

        s, cfg = self.s, self.cfg
        jobs: list[tuple[str, int]] = []
        rng = np.random.default_rng([s.seed, 7919])
        while len(jobs) < s.dagger_prompts:
            md = sample_prompt(self.tiers[len(jobs) % len(self.tiers)], rng, self.grid)
            if not held_out(md):
                jobs.append((md["prompt"], int(rng.integers(2**31))))
        gen = make_generator("noisy-oracle", grid=self.grid, cell=cfg.world.cell)
        ver = build_verifier(cfg)
        metrics: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="clvr-dagger-") as d:
            self.save_model(Path(d))
            rec = RecordingController(LearnedController(d, self.grid, cfg.loop.retries_per_step,
                                                        cfg.loop.max_prompt_chars))
            for b in s.budgets:
                traces = run_many(jobs, rec, gen, ver, replace(cfg.loop, max_calls=b), "loop", self.grid,
                                  cfg.world.cell)
                metrics[f"student_pass_b{b}"] = float(np.mean([t.passed for t in traces]))
                metrics[f"student_rejected_b{b}"] = float(sum(t.rejected for t in traces))
        own = label_examples(rec.states, self.teacher, tuple(s.budgets), self.tokenizer, set())
        metrics.update({"states": float(len(rec.states)), "own_examples": float(len(own)),
                        **{f"own_{k}": v for k, v in exact_match(self.plain(), self.lex, own, self.pad).items()}})
        new = [x for x in own if (x.text, x.step) not in self.seen]
        self.seen.update((x.text, x.step) for x in new)
        metrics["new_examples"] = float(len(new))
        return new, metrics

    # ---- training --------------------------------------------------------------------------------------------

    def exact_match(self, examples: list[Decision]) -> dict[str, float]:
        """Rank 0 measures on the plain model (a gathered copy under ZeRO-3); {} on the other ranks."""
        e = self.engine
        if e.ecfg.zero_stage < 3:
            return self.measure(self.plain(), examples) if e.is_main else {}
        with tempfile.TemporaryDirectory(prefix="clvr-eval-") as d:
            with e.full_params():
                if e.is_main:
                    self.save_model(Path(d))
            ev = self.measure(self.reload(d), examples) if e.is_main else {}
        return ev

    def phase_bounds(self, phase: int) -> tuple[int, int]:
        """[start, end) steps of phase 0 (the first training: `steps`) or DAgger round `phase` (`dagger_steps`,
        0 = `steps`)."""
        s = self.s
        ds = s.dagger_steps or s.steps
        return (0, s.steps) if phase == 0 else (s.steps + (phase - 1) * ds, s.steps + phase * ds)

    def phase_of(self, step: int) -> int:
        ds = self.s.dagger_steps or self.s.steps
        return 0 if step < self.s.steps else 1 + (step - self.s.steps) // ds

    def train_step(self, groups: list[list[int]], pool: list[Decision], phase_start: int,
                   phase_len: int) -> dict[str, float]:
        s = self.s
        lr = lr_at(self.step - phase_start, s.lr, s.warmup, phase_len, s.min_lr_frac)
        self.engine.set_lr(lr)
        b = self.batch(self.rows(self.step, groups, pool))
        out = self.live(**{k: self.engine.to_device(v) for k, v in b.items()})
        gn = self.engine.step(out.loss)
        self.step += 1
        return {"loss": out.loss.item(), "grad_norm": gn, "lr": lr}

    def save(self) -> None:
        self.engine.save(self.out, self.step, self.save_model, {"config": to_dict(self.cfg)})

    def fit(self) -> dict:
        """Train `steps`, then each DAgger round and `dagger_steps` (0 = `steps`) more. Rank 0 writes
        metrics.jsonl, final/ and metrics.json (flat floats); every rank returns rank 0's metrics."""
        s, out, e = self.s, self.out, self.engine
        main = e.is_main
        t0 = time.perf_counter()
        log = ckpt.MetricsLog(out / "metrics.jsonl", self.step) if main else None
        total = self.phase_bounds(s.dagger_rounds)[1]
        summary: dict[str, float] = {}
        last: dict[str, float] = {}
        bar = tqdm(total=total, initial=self.step, desc="controller_sft", dynamic_ncols=True, mininterval=2,
                   disable=not main)
        while self.step < total:
            phase = self.phase_of(self.step)
            for r in range(1, phase + 1):
                if r not in self.rounds:
                    if self.step == self.phase_bounds(r)[0]:  # (rank 0 measures; the others get {})
                        summary.update({f"dagger_r{r}_before_{k}": v for k, v in self.exact_match(self.evals).items()})
                    self.rounds[r] = self.round_data(r)
                    rm = out / ROUNDS / f"round-{r}.metrics.json"
                    summary.update({f"dagger_r{r}_{k}": v for k, v in ckpt.read_json(rm).items()})
            pool, (start, end) = self.pool(phase), self.phase_bounds(phase)
            groups = length_groups(pool, s.batch_size, s.seed)
            while self.step < end:
                stats = self.train_step(groups, pool, start, end - start)
                bar.update(1)
                if self.step % s.log_every == 0 or self.step == end:
                    last = e.mean_stats(stats)
                    if main:
                        log.log(self.step, "train", **last)
                        bar.set_postfix(loss=f"{last['loss']:.4f}")
                if self.step % s.eval_every == 0 or self.step == end:
                    ev = self.exact_match(self.evals)
                    e.barrier()
                    if main:
                        log.log(self.step, "eval", **ev)
                        bar.write(f"[controller_sft step {self.step}] " + " ".join(f"{k}={v:.3f}" for k, v in ev.items()))
                        if self.step == end and phase:
                            summary.update({f"dagger_r{phase}_after_{k}": v for k, v in ev.items()})
                        if self.step == end:
                            summary.update({f"eval_{k}": v for k, v in ev.items()})
                if self.step % s.ckpt_every == 0 or self.step == end:
                    self.save()
        bar.close()
        metrics = {**{f"train_{k}": float(v) for k, v in last.items()}, **self.stats, **summary,
                   "steps": float(self.step), "wall_s": time.perf_counter() - self.t_start}
        if not any(k.startswith("eval_") for k in metrics):  # a finished run asked again: measure the final model
            metrics.update({f"eval_{k}": v for k, v in self.exact_match(self.evals).items()})
        with e.full_params():
            if main:
                atomic_dir(out / "final", self.save_model)
                ckpt.write_json(out / "metrics.json", metrics)
        e.barrier()
        return {"metrics": ckpt.read_json(out / "metrics.json"), "final": str(out / "final")}


def run(cfg: Config) -> dict:
    """The stage: train (and DAgger) to `controller_sft.steps + dagger_rounds * dagger_steps`; {"metrics", "final"}."""
    import sys

    torch.set_num_threads(cfg.controller_sft.threads)
    trainer = ControllerTrainer
    if cfg.controller_sft.model_class == "vlm":  # [vlm hook] the real-scale path
        from clvr.learned.vlm import VLMTrainer as trainer
    return trainer(cfg, Path(cfg.controller_sft.out), log=lambda m: print(m, file=sys.stderr, flush=True)).fit()
