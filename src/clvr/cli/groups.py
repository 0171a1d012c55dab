"""Command groups shared by several command modules (`clvr world ...`, `clvr eval ...`)."""

import typer

from clvr.cli import app

world_app = typer.Typer(help="The synthetic world: render, detect, judge, train its models.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluation: GenEval-format judge, complexity probe, speed table.", no_args_is_help=True)
app.add_typer(world_app, name="world")
app.add_typer(eval_app, name="eval")
