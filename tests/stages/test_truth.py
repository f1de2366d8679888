"""Ground-truth tables: clean shows its kept rate, every corruption its removal rate (markdown and terminal)."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from curate.stages.truth import removal_rates, truth_markdown
from curate.ui import truth_rich_table


def small_table() -> dict:
    truth = np.array(["clean"] * 4 + ["swapped"] * 4 + ["generic"] * 2, dtype=object)
    kept = np.array([1, 1, 1, 0] + [1, 0, 0, 0] + [0, 0], dtype=bool)  # clean 3/4 kept, swapped 3/4 removed
    return {"sub": {"kept": int(kept.sum()), "pool": len(kept), "kinds": removal_rates(truth, kept)}}


def test_rates_by_hand():
    kinds = small_table()["sub"]["kinds"]
    assert list(kinds) == ["clean", "generic", "swapped"]
    assert kinds["clean"] == {"pool": 4, "kept": 3, "kept_rate": 0.75, "removed_rate": 0.25}
    assert kinds["generic"]["removed_rate"] == 1.0 and kinds["swapped"]["removed_rate"] == 0.75


def test_markdown_and_terminal_show_kept_for_clean_and_removed_for_corruptions():
    table = small_table()
    md = truth_markdown(table)
    assert "| clean kept | generic removed | swapped removed |" in md
    assert "| 75.0 % | 100.0 % | 75.0 % |" in md
    console = Console(record=True, width=200)
    console.print(truth_rich_table(table))
    text = console.export_text()
    row = next(line for line in text.splitlines() if line.startswith("│ sub "))
    assert [cell.strip() for cell in row.split("│")[3:6]] == ["75.0 %", "100.0 %", "75.0 %"]
