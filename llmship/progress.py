"""Progress reporting shared by the stages: each takes `progress` as None, a callable taking one status line,
or a rich Progress (what the CLI passes), and reports through one of these adapters."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from rich.console import Console

log = logging.getLogger("llmship")

# The console every progress bar and error line goes to (results go to files under output.dir).
stderr = Console(stderr=True)


class Counter:
    """Counted work (`description`, done of total), one bar per description."""

    def __init__(self, target: Any):
        self.target = target
        self.tasks: dict[str, Any] = {}

    def __call__(self, description: str, done: int, total: int) -> None:
        if self.target is None:
            return
        if hasattr(self.target, "add_task"):
            if description not in self.tasks:
                self.tasks[description] = self.target.add_task(description, total=total)
            self.target.update(self.tasks[description], completed=done, total=total)
        else:
            self.target(f"{description}: {done}/{total}")

    def scoped(self, prefix: str) -> Callable[[str, int, int], None]:
        return lambda description, done, total: self(f"{prefix}: {description}", done, total)

    def finish(self) -> None:
        if hasattr(self.target, "remove_task"):
            for task in self.tasks.values():
                self.target.remove_task(task)


class Steps:
    """Named steps of one stage: logged, and shown as the description of one bar."""

    def __init__(self, progress: Any, title: str, total: int | None = None):
        self.progress = progress
        self.task = progress.add_task(title, total=total) if hasattr(progress, "add_task") else None

    def __call__(self, message: str) -> None:
        log.info("%s", message)
        if self.task is not None:
            self.progress.update(self.task, description=message)
        elif callable(self.progress):
            self.progress(message)

    def advance(self) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def done(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
