"""Terminal output shared by commands: progress bars with samples/s and summary tables (rich)."""

from __future__ import annotations

import contextlib

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@contextlib.contextmanager
def sample_progress(label: str, total: int | None = None):
    """A rich progress bar counting samples; yields `advance(n)`."""
    columns = [TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn() if total else TextColumn("{task.completed} samples"),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(label, total=total, rate="")

        def advance(n: int) -> None:
            progress.advance(task, n)
            t = progress.tasks[task]
            if t.elapsed:
                progress.update(task, rate=f"{t.completed / t.elapsed:,.0f} samples/s")

        yield advance


def embed_summary_table(result: dict, max_rows: int = 20) -> Table:
    table = Table(title=f"embed: {result['embedded']:,} embedded, {result['skipped']:,} skipped, "
                        f"{result['shards_skipped_done']} of {result['shards_total']} shards already done, "
                        f"{result['seconds']:.1f} s")
    for col in ("shard", "embedded", "skipped", "notes", "skip reasons"):
        table.add_column(col, justify="right" if col in ("embedded", "skipped", "notes") else "left")
    for s in result["shards"][:max_rows]:
        reasons = ", ".join(f"{k} ×{v}" for k, v in sorted(s["reasons"].items()))
        table.add_row(s["shard"], f"{s['embedded']:,}", f"{s['skipped']:,}", f"{s['notes']:,}", reasons)
    if len(result["shards"]) > max_rows:
        table.add_row(f"… {len(result['shards']) - max_rows} more", "", "", "", "")
    return table
