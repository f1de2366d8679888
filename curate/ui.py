"""Terminal output shared by commands: progress bars with samples/s and summary tables (rich)."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class StageProgress:
    """A stage's progress bar: `bar(n)` adds n done units (samples unless `unit` says otherwise) and
    `bar.count(n)` n processed samples (for the rate, when the unit is another one, e.g. shards).

    The bar appears at the first call, not before: a stage that stops with an error before any work shows
    the error alone, not an empty bar above it. With a total (given or set by the stage with `set_total`)
    it shows done / total and the ETA; the rate is always samples/s."""

    def __init__(self, label: str, total: float | None = None, unit: str = "samples", console: Console | None = None):
        self.label, self.total, self.unit, self.console = label, total, unit, console
        self.progress: Progress | None = None
        self.task = None
        self.samples = 0

    @property
    def done(self) -> float:
        """Units done so far."""
        return self.progress.tasks[self.task].completed if self.progress is not None else 0

    def set_total(self, total: float | None) -> None:
        self.total = total
        if self.progress is not None:
            self.progress.update(self.task, total=total)

    def _start(self) -> None:
        if self.progress is not None:
            return
        columns = [TextColumn(f"[bold]{self.label}[/]"), BarColumn(),
                   TextColumn("{task.fields[done]}"), TextColumn("{task.fields[rate]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        self.progress = Progress(*columns, console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.label, total=self.total, done="", rate="")

    def __call__(self, n: float = 0) -> None:
        self._start()
        self.progress.advance(self.task, n)
        if self.unit == "samples":
            self.samples += n
        self._refresh()

    def count(self, samples: int) -> None:
        self._start()
        self.samples += samples
        self._refresh()

    def _refresh(self) -> None:
        t = self.progress.tasks[self.task]
        done = f"{t.completed:,.0f}" + (f" / {t.total:,.0f}" if t.total is not None else "") + f" {self.unit}"
        if self.unit != "samples":
            done += f", {self.samples:,} samples"
        rate = f"{self.samples / t.elapsed:,.0f} samples/s" if t.elapsed else ""
        self.progress.update(self.task, done=done, rate=rate)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@contextlib.contextmanager
def sample_progress(label: str, total: float | None = None, unit: str = "samples", console: Console | None = None):
    """A `StageProgress` for the length of the block (see there)."""
    bar = StageProgress(label, total, unit, console)
    try:
        yield bar
    finally:
        bar.close()


def embed_summary_line(result) -> str:
    return (f"embed: {result.embedded:,} embedded, {result.skipped:,} skipped, "
            f"{result.shards_skipped_done} of {result.shards_total} shards already done, "
            f"{result.seconds:.1f} s -> {result.out}")


def embed_summary_table(result: dict, max_rows: int = 20) -> Table:
    """Per shard of this run (failed ones first, then those with skips or notes): counts and skip reasons."""
    table = Table()
    for col in ("shard", "embedded", "skipped", "notes", "skip reasons"):  # fold, never cut: names must stay apart
        table.add_column(col, justify="right" if col in ("embedded", "skipped", "notes") else "left", overflow="fold")
    for f in result.failures:
        table.add_row(f["task"], "-", "-", "-", f"FAILED after {f['attempts']} attempt(s): "
                      f"{f['error'].splitlines()[-1] if f['error'] else 'error'}")
    # shards with skips or notes first: with thousands of shards the damaged ones must not hide below the cut
    shards = sorted(result.shards, key=lambda s: not (s["skipped"] or s["notes"]))
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
    table.add_column("subset", overflow="fold")
    table.add_column("kept", justify="right", overflow="fold")
    for k in kinds:
        table.add_column(f"{k} {'kept' if k == 'clean' else 'removed'}", justify="right", overflow="fold")
    for name, r in truth.items():
        cells = []
        for k in kinds:
            d = r["kinds"].get(k)
            cells.append("" if d is None else f"{100 * headline_rate(k, d):.1f} %")
        table.add_row(name, f"{r['kept']:,} / {r['pool']:,}", *cells)
    return table
