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
    for f in result.get("failures", []):
        table.add_row(f["task"], "-", "-", "-", f"FAILED after {f['attempts']} attempt(s): "
                      f"{f['error'].splitlines()[-1] if f['error'] else 'error'}")
    # shards with skips or notes first: with thousands of shards the damaged ones must not hide below the cut
    shards = sorted(result["shards"], key=lambda s: not (s["skipped"] or s["notes"]))
    for s in shards[:max_rows]:
        reasons = ", ".join(f"{k} ×{v}" for k, v in sorted(s["reasons"].items()))
        table.add_row(s["shard"], f"{s['embedded']:,}", f"{s['skipped']:,}", f"{s['notes']:,}", reasons)
    if len(shards) > max_rows:
        table.add_row(f"… {len(shards) - max_rows} more", "", "", "", "")
    return table


def truth_rich_table(truth: dict) -> Table:
    """The ground-truth removal table (curate.stages.truth.truth_table) for the terminal."""
    from curate.stages.truth import headline_rate

    kinds = sorted({k for r in truth.values() for k in r["kinds"]}, key=lambda k: (k != "clean", k))
    table = Table(title="ground truth: clean kept / corruptions removed")
    table.add_column("subset")
    table.add_column("kept", justify="right")
    for k in kinds:
        table.add_column(f"{k} {'kept' if k == 'clean' else 'removed'}", justify="right")
    for name, r in truth.items():
        cells = []
        for k in kinds:
            d = r["kinds"].get(k)
            cells.append("" if d is None else f"{100 * headline_rate(k, d):.1f} %")
        table.add_row(name, f"{r['kept']:,} / {r['pool']:,}", *cells)
    return table
