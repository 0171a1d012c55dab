"""Terminal progress for `clvr pipeline run`: one rich row per stage with its state, time and latest output line.
Tasks report through the module-level `REPORTER`; it is None (silent) unless the CLI turns it on."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Reporter:
    def __init__(self, stages: list[str], console: Console | None = None):
        self.progress = Progress(SpinnerColumn(finished_text="[green]✓"), TextColumn("{task.fields[stage]:<10}"),
                                 BarColumn(bar_width=12), TextColumn("{task.fields[state]:<9}"), TimeElapsedColumn(),
                                 TextColumn("[dim]{task.description}"), console=console or Console(stderr=True),
                                 transient=False, refresh_per_second=4)
        self.ids = {s: self.progress.add_task("", total=1, start=False, stage=s, state="waiting") for s in stages}

    def __enter__(self) -> "Reporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, stage: str, state: str = "running") -> None:
        self.progress.reset(self.ids[stage], start=True, completed=0, stage=stage, state=state, description="")  # or retry

    def line(self, stage: str, text: str) -> None:
        self.progress.update(self.ids[stage], description=text[-90:])

    def done(self, stage: str, state: str, note: str = "") -> None:
        self.progress.update(self.ids[stage], state=state, description=note, completed=1)
        self.progress.stop_task(self.ids[stage])


REPORTER: Reporter | None = None


def report(method: str, stage: str, *args: str) -> None:
    """REPORTER.<method>(stage, *args) when progress is shown."""
    if REPORTER is not None and stage in REPORTER.ids:
        getattr(REPORTER, method)(stage, *args)
