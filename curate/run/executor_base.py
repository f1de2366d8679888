"""What every executor shares: a task's failure record, a run's report, the Executor interface, and running one
task with retries (in this process, a pool worker or a Ray worker alike)."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from curate.errors import CurateError


@dataclass
class TaskFailure:
    task: str
    error: str
    attempts: int
    user_error: bool = False  # a CurateError (bad input, missing weights): not retried, its message says it all


@dataclass
class RunReport:
    results: list[Any] = field(default_factory=list)
    failures: list[TaskFailure] = field(default_factory=list)

    def raise_user_error(self) -> None:
        """A task's CurateError as the run's own one-line error (the first; others are alike or follow from it)."""
        for failure in self.failures:
            if failure.user_error:
                raise CurateError(failure.error)

    def raise_if_failed(self, stage: str) -> None:
        self.raise_user_error()
        if self.failures:
            lines = "; ".join(f"{f.task} ({f.error.splitlines()[-1] if f.error else 'error'}, {f.attempts} attempts)"
                              for f in self.failures)
            raise CurateError(f"{stage}: {len(self.failures)} task(s) failed after retries: {lines}. "
                              "Finished work is kept; rerun to retry only these.")


def call_with_retries(fn: Callable, task: Any, retries: int) -> tuple[Any, TaskFailure | None]:
    last = ""
    for attempt in range(1, retries + 2):
        try:
            return fn(task), None
        except CurateError as exc:  # a user error will not go away on retry
            return None, TaskFailure(task_name(task), str(exc), attempt, user_error=True)
        except Exception:  # noqa: BLE001 - any crash of a task is retried, then reported
            last = traceback.format_exc()
    return None, TaskFailure(task_name(task), last.strip(), retries + 1)


def task_name(task: Any) -> str:
    return getattr(task, "name", None) or str(task)


class Executor:
    """Run `fn(task)` for every task; results come back in task order."""

    def run(self, fn: Callable, tasks: Sequence[Any], retries: int = 0, fail_fast: bool = False) -> RunReport:
        raise NotImplementedError
