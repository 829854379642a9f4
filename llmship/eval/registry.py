"""The eval tasks, in summary-table order. Adding a task: one module with an `EvalTask` subclass (llmship.eval.tasks),
one config section under `eval`, and its class here."""

from __future__ import annotations

from llmship.config import Config
from llmship.eval.ceval import Ceval
from llmship.eval.cmmlu import Cmmlu
from llmship.eval.consistency import Consistency
from llmship.eval.perplexity import AlpacaPerplexity, C4Perplexity
from llmship.eval.tasks import EvalTask

TASKS: tuple[type[EvalTask], ...] = (Ceval, Cmmlu, C4Perplexity, AlpacaPerplexity, Consistency)


def enabled_tasks(cfg: Config) -> list[EvalTask]:
    """The tasks this config runs, bound to it."""
    return [task(cfg) for task in TASKS if task.enabled(cfg)]


def task_of(metric: str) -> type[EvalTask] | None:
    return next((task for task in TASKS if task.produces(metric)), None)


def higher_is_better(metric: str) -> bool:
    """The metric's direction, as the task producing it declares (accuracies and agreements up, perplexities and
    divergences down); a name no task produces counts as higher-is-better."""
    task = task_of(metric)
    return True if task is None else task.higher_is_better(metric)
