"""`clvr world vae`, `clvr world pretrain`, `clvr world finetune`, `clvr world distill`, `clvr world sft`,
`clvr world controller-sft`, `clvr world ship`, `clvr world bench-generator`."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from clvr.cli import ProfileOpt
from clvr.cli.groups import world_app
from clvr.config import load_config

Overrides = typer.Argument(None, help="key=value config overrides, e.g. pretrain.steps=100")
# The config sections each command reads: an override of another section is an error, not silently ignored.
VAE_USES = ("world", "vae", "engine")
TRAIN_USES = ("world", "generator", "pretrain", "sample", "engine")
FINETUNE_USES = ("world", "generator", "pretrain", "finetune", "sample", "engine")
DISTILL_USES = ("world", "generator", "pretrain", "finetune", "distill", "sample", "engine")
SFT_USES = ("world", "weights", "sft", "sample", "engine")
CONTROLLER_SFT_USES = ("world", "loop", "controller_sft", "engine")


@world_app.command("vae")
def vae(overrides: Optional[List[str]] = Overrides, profile: str = ProfileOpt) -> None:
    """Train the cell autoencoder a latent generator draws with (generator.vae; resumes from the newest checkpoint
    in vae.out). Last line: JSON metrics."""
    from clvr.train.vae import run

    res = run(load_config(profile, overrides, uses=VAE_USES, command="world vae"))
    typer.echo(json.dumps({"final": res["final"], **res["metrics"]}))


@world_app.command("pretrain")
def pretrain(overrides: Optional[List[str]] = Overrides, profile: str = ProfileOpt) -> None:
    """Train the world generator (resumes from the newest checkpoint in pretrain.out). Last line: JSON metrics."""
    from clvr.train.pretrain import run

    res = run(load_config(profile, overrides, uses=TRAIN_USES, command="world pretrain"))
    typer.echo(json.dumps({"final": res["final"], **res["metrics"]}))


@world_app.command("finetune")
def finetune(overrides: Optional[List[str]] = Overrides, profile: str = ProfileOpt) -> None:
    """The move-heavy fine-tune of the foundation flow: the pretrain trainer on the finetune section, from
    finetune.init ("" = <pretrain.out>/final); resumes from the newest checkpoint in finetune.out. Last line: JSON
    metrics."""
    from clvr.train.finetune import run

    res = run(load_config(profile, overrides, uses=FINETUNE_USES, command="world finetune"))
    typer.echo(json.dumps({"final": res["final"], **res["metrics"]}))


@world_app.command("distill")
def distill(overrides: Optional[List[str]] = Overrides, profile: str = ProfileOpt) -> None:
    """Distill the base into a 4-NFE student without CFG (distill.method: guidance | progressive). Last line: JSON
    metrics."""
    from clvr.train.distill import run

    res = run(load_config(profile, overrides, uses=DISTILL_USES, command="world distill"))
    typer.echo(json.dumps({"final": res["final"], **res["metrics"]}))


@world_app.command("sft")
def sft(overrides: Optional[List[str]] = Overrides, profile: str = ProfileOpt) -> None:
    """Fine-tune a released generator (sft.init, default the shipped base) on coarse steps: multi-op edits and
    layout text-to-image (+ the data engine's examples with sft.data), LoRA or full (sft.mode); resumes from the
    newest checkpoint in sft.out. Last line: JSON metrics."""
    from clvr.train.sft import run

    res = run(load_config(profile, overrides, uses=SFT_USES, command="world sft"))
    typer.echo(json.dumps({"final": res["final"], **res["metrics"]}))


@world_app.command("controller-sft")
def controller_sft(overrides: Optional[List[str]] = Overrides, profile: str = ProfileOpt) -> None:
    """Train the learned controller on the data engine's trajectories (controller_sft.data): each decision state
    -> the symbolic teacher's step at every calls-left budget; LoRA or full (controller_sft.mode), optional DAgger
    rounds; resumes from the newest checkpoint in controller_sft.out. Last line: JSON metrics."""
    from clvr.learned.train import run

    res = run(load_config(profile, overrides, uses=CONTROLLER_SFT_USES, command="world controller-sft"))
    typer.echo(json.dumps({"final": res["final"], **res["metrics"]}))


@world_app.command("ship")
def ship(src: str = typer.Argument(..., help="a trained checkpoint folder, e.g. runs/release/distill-rebalance/final"),
         name: str = typer.Argument(..., help="base | distilled")) -> None:
    """Install a checkpoint as the packaged base or distilled weights (its model card is kept; update it)."""
    from clvr.models.backend import ship as ship_weights

    typer.echo(f"shipped {src} as {ship_weights(src, name)}")


@world_app.command("bench-generator")
def bench_generator(model: str = typer.Option("base", "--model", help="base | a checkpoint folder (base model)"),
                    distilled: str = typer.Option("distilled", "--distilled", help="distilled | a checkpoint folder"),
                    trials: int = typer.Option(100, min=1, help="edits per op"),
                    prompts: int = typer.Option(50, min=1, help="single-step prompts per tier"),
                    sft_model: Optional[str] = typer.Option(None, "--sft", help="an SFT model folder to bench too"),
                    multi_trials: Optional[int] = typer.Option(None, "--multi-trials", min=1,
                                                               help="multi-op steps per k (default: --trials)"),
                    speed: bool = typer.Option(True, "--speed/--no-speed", help="also time training and sampling"),
                    overrides: Optional[List[str]] = Overrides, profile: str = ProfileOpt) -> None:
    """Edit success per op and multi-op step success by k (1, 2, 3, 4, 6, 8 mixed ops in one call) for base at
    28 steps + CFG and at 4, distilled at 4 NFE (and an SFT model with --sft), single-step pass per tier, speed.
    Last line: one JSON object."""
    import torch

    from clvr.train.bench import run_bench

    cfg = load_config(profile, overrides, uses=TRAIN_USES, command="world bench-generator")
    torch.set_num_threads(cfg.pretrain.threads)
    typer.echo(json.dumps(run_bench(cfg, model, distilled, trials, prompts, sft=sft_model,
                                    multi_trials=multi_trials, speed=speed)))
