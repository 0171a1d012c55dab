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


def one_line(text: str) -> str:
    """A message fit for one terminal line: control characters (newlines, escape codes) shown escaped, never
    sent raw (a hostile prompt or file name cannot move the cursor or recolour the terminal)."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def main() -> None:
    """Run the CLI. Bad input (ClvrError) and a path the OS refuses (OSError: disk full, no permission) end in
    one line `error: ...` on stderr and exit code 2, never a traceback."""
    _register()
    try:
        app()
    except ClvrError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f" '{e.filename}'" if e.filename else ""
        print(f"error: {one_line(f'cannot use{where}: {e.strerror or e}')}", file=sys.stderr)
        sys.exit(2)
