"""`clvr config show`."""

from __future__ import annotations

from typing import List, Optional

import typer

from clvr.cli import ProfileOpt, app
from clvr.config import load_config, to_yaml

config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("show")
def show(overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides"),
         profile: str = ProfileOpt) -> None:
    """Print the resolved config (schema < base.yaml < PROFILE.yaml < overrides)."""
    typer.echo(to_yaml(load_config(profile, overrides)), nl=False)
