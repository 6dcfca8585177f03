"""The run's console: rich progress bars (steps, and the stage running now: rollout with its ready groups, training,
weight sync, evaluation) above one summary line per step. Bars are drawn only on a terminal and vanish when the run
ends; elsewhere (CI logs, pipes, pytest) only the summary lines are printed, as plain lines."""
from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class RunConsole:
    def __init__(self, num_steps: int, first_step: int = 0, console: Console | None = None):
        self.console = console or Console()
        self.live = self.console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<10}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True,
                                 disable=not self.live)
        self._steps = self.progress.add_task("steps", total=num_steps, completed=first_step)
        self._stage = self.progress.add_task("", total=None, visible=False)

    def __enter__(self) -> "RunConsole":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None):
        """The stage running now; `total` gives it a bar (update() moves it), None a spinner."""
        self.progress.update(self._stage, description=name, total=total, completed=0, visible=True)
        try:
            yield self
        finally:
            self.progress.update(self._stage, visible=False)

    def update(self, completed: int) -> None:
        self.progress.update(self._stage, completed=completed)

    def step_done(self) -> None:
        self.progress.advance(self._steps)

    def print(self, line: str) -> None:
        """A summary line, above the bars on a terminal; a plain unwrapped line elsewhere."""
        if self.live:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stdout, flush=True)
