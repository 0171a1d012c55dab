"""`clvr` command line. Each command group lives in its own module; `main` maps user errors to exit 2."""

from __future__ import annotations

import sys

import typer

from clvr.errors import ClvrError

app = typer.Typer(help="clvr: closed-loop visual reasoning for text-to-image.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

ProfileOpt = typer.Option("cpu", "--profile", "-p", help="Config profile in conf/ (ci, cpu, ...).")


def _register() -> None:
    """Import every clvr.cli.*_cmd module; each adds its commands to `app` (or to a group it imports)."""
    import importlib
    import pkgutil

    import clvr.cli as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if m.name.endswith("_cmd")):
        importlib.import_module(f"clvr.cli.{mod}")


def main() -> None:
    _register()
    try:
        app()
    except ClvrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
