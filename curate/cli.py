"""The `curate` command line: parse arguments, call a stage, print. No logic lives here.

Each stage's command sits in its own section below; stage code is imported lazily inside the
command so that `curate --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from curate.errors import CurateError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Curate web-scale image-text corpora with a CLIP teacher.")
teacher_app = typer.Typer(no_args_is_help=True, help="Train or inspect teachers.")
app.add_typer(teacher_app, name="teacher")
console = Console(stderr=True)


def main() -> None:
    """Console entry point: user errors print one clear line (exit 2), never a traceback."""
    try:
        app()
    except CurateError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; finished shards are kept, rerun to resume")
        sys.exit(130)


# ---------------------------------------------------------------- synth (issue 4)

# ---------------------------------------------------------------- teacher (issue 4)

# ---------------------------------------------------------------- embed (issue 4)

@app.command("embed")
def embed_cmd(
    shards: List[str] = typer.Argument(..., help="Directory, glob, brace pattern (data/{00000..00009}.tar) or fsspec URL."),
    out: Path = typer.Option(..., "--out", help="Embedding directory: one <stem>.parquet per shard."),
    model: str = typer.Option("curate-tiny", help="open_clip model name (ViT-B-32, ViT-L-14, curate-tiny, ...)."),
    pretrained: str = typer.Option("none", help="open_clip tag (openai, laion2b_...), a local checkpoint path, or none."),
    batch_size: int = typer.Option(256, "--batch-size"),
    device: str = typer.Option("auto", help="auto (cuda when present), cpu or cuda."),
    precision: str = typer.Option("fp32", help="fp32, fp16 or bf16 (autocast on CUDA)."),
    workers: int = typer.Option(2, help="DataLoader decode workers."),
    keep_json: bool = typer.Option(True, "--keep-json/--no-keep-json", help="Keep each sample's .json as a `json` column."),
    rank: Optional[int] = typer.Option(None, help="This rank (default: SLURM_ARRAY_TASK_ID or 0)."),
    world_size: Optional[int] = typer.Option(None, "--world-size", help="Number of ranks (default: SLURM_ARRAY_TASK_COUNT or 1)."),
    executor: str = typer.Option("local", help="local or ray."),
    tasks: int = typer.Option(1, help="Split this rank's shards into this many tasks (one teacher load each)."),
    retries: int = typer.Option(1, help="Retries per failed task."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed task."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="auto or HOST:PORT; local Ray when absent."),
):
    """Embed tar shards with a CLIP teacher into L2-normalised fp16 Parquet tables keyed by uid."""
    from curate.stages.embed import EmbedConfig, embed
    from curate.ui import embed_summary_table, sample_progress

    config = EmbedConfig(model, pretrained, device, precision, batch_size, workers, keep_json)
    with sample_progress("embed") as advance:
        result = embed(shards, out, config, rank, world_size, executor, tasks, retries, fail_fast, ray_address,
                       progress=advance)
    console.print(embed_summary_table(result))
    if result["failures"]:
        names = ", ".join(f["task"] for f in result["failures"])
        raise CurateError(f"embed: {len(result['failures'])} task(s) failed after retries ({names}); "
                          f"finished shards are kept, rerun to retry. First error: {result['failures'][0]['error'].splitlines()[-1]}")

# ---------------------------------------------------------------- score / normsim (issue 5)

# ---------------------------------------------------------------- filter / export / import (issue 5)

# ---------------------------------------------------------------- clones / pcme / eval (issue 6)

# ---------------------------------------------------------------- train / compare / report (issue 7)

# ---------------------------------------------------------------- run (issue 8)


if __name__ == "__main__":
    main()
