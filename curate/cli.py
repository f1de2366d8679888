"""The `curate` command line: parse arguments, call a stage, print. No logic lives here.

Each stage's command sits in its own section below; stage code is imported lazily inside the
command so that `curate --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from curate.compare import CompareConfig
from curate.config import RunOptions, stage_command
from curate.errors import CurateError
from curate.stages import decontaminate as decontaminate_stage
from curate.stages import dedup as dedup_stage
from curate.stages import embed as embed_stage
from curate.stages import export as export_stage
from curate.stages import filter as filter_stage
from curate.stages import normsim as normsim_stage
from curate.stages import score as score_stage
from curate.stages.clones import ClonesConfig
from curate.stages.decontaminate import DecontaminateConfig
from curate.stages.dedup import DedupConfig
from curate.stages.embed import EmbedConfig
from curate.stages.evaluate import EvalConfig
from curate.stages.export import ExportConfig
from curate.stages.filter import FilterConfig
from curate.stages.import_datacomp import ImportDatacompConfig
from curate.stages.normsim import NormsimConfig
from curate.stages.pcme import PcmeCalibrateConfig, PcmeFitConfig, PcmeScoreConfig
from curate.stages.report import ReportConfig
from curate.stages.score import ScoreConfig
from curate.stages.synth import SynthConfig
from curate.stages.teacher import TeacherTrainConfig, TinyTeacherConfig
from curate.stages.train_student import StudentConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Curate web-scale image-text corpora with a CLIP teacher.")


def print_version(value: bool) -> None:
    if value:
        from curate import __version__

        print(f"curate {__version__}")
        raise typer.Exit()


@app.callback()
def root_options(version: bool = typer.Option(False, "--version", callback=print_version, is_eager=True,
                                              help="Print the version and exit.")) -> None:
    """Curate web-scale image-text corpora with a CLIP teacher."""
teacher_app = typer.Typer(no_args_is_help=True, help="Train or inspect teachers.")
app.add_typer(teacher_app, name="teacher")
console = Console(stderr=True)


# What the running command has finished, said when Ctrl-C stops it (each command sets its own).
interrupt_note: dict[str, Callable[[], str]] = {}


def on_interrupt(note: Callable[[], str]) -> None:
    """Register what to say about finished work if the command is interrupted now."""
    interrupt_note["note"] = note


def interrupted_message() -> str:
    note = interrupt_note.get("note")
    try:
        finished = note() if note else ""
    except Exception:  # noqa: BLE001 - saying what is finished must not fail the exit
        finished = ""
    return (f"[yellow]interrupted[/]: {finished + '; ' if finished else ''}every file is written atomically, so "
            "nothing half-written is left; rerun the same command to resume")


def main() -> None:
    """Console entry point: user errors print one clear line (exit 2), never a traceback; Ctrl-C says what
    was finished (exit 130)."""
    try:
        app()
    except CurateError as exc:  # escaped: a recipe's "[section]" in a message is text, not rich markup
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:  # outside typer's own handling
        console.print(interrupted_message(), highlight=False, soft_wrap=True)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130
            console.print(interrupted_message(), highlight=False, soft_wrap=True)
        raise


def finished_units(out: Path, stage: str) -> int:
    from curate.run.markers import Markers

    return len(Markers(out, stage).done())


# ---------------------------------------------------------------- synth

@stage_command(app, "synth", SynthConfig)
def synth_cmd(
    out: Path = typer.Argument(..., help="Output directory (new, empty, or a corpus made with the same parameters)."),
    *, cfg: SynthConfig,
) -> None:
    """Write a synthetic image-caption corpus with known corruptions, and a target set, as WebDataset shards."""
    from rich.table import Table

    from curate.stages.synth import entry as synth

    summary = synth.run(out, cfg)
    table = Table(title=f"synth corpus in {summary.out}")
    table.add_column("truth")
    table.add_column("samples", justify="right")
    for kind, count in summary.truth_counts.items():
        table.add_row(kind, str(count))
    console.print(table)
    console.print(f"{summary.samples} samples in {summary.shards} shards, "
                  f"{summary.target_samples} target samples in {summary.target_shards} shards, "
                  f"{summary.seconds:.1f} s")


# ---------------------------------------------------------------- teacher

@stage_command(teacher_app, "train", TeacherTrainConfig, group="teacher")
def teacher_train_cmd(
    corpus: str = typer.Argument(..., help="Synth corpus: directory, glob or brace pattern of tar shards."),
    out: Path = typer.Option(..., "--out", help="Checkpoint file to write (atomic), e.g. teacher.pt."),
    *, cfg: TeacherTrainConfig,
):
    """Train a small CLIP teacher from scratch on a synth corpus and save a checkpoint with its metadata."""
    from curate.stages.teacher import entry as teacher

    def log(entry: dict) -> None:
        console.print(f"step {entry['step']:>5}/{cfg.steps}  loss {entry['loss']:.4f}  "
                      f"lr {entry['lr']:.2e}  logit_scale {entry['logit_scale']:.2f}", highlight=False)

    summary = teacher.run(corpus, out, cfg, on_log=log)
    excluded = sum(summary.excluded_by_truth.values())
    console.print(f"[bold]teacher[/]: {summary.samples:,} pairs ({excluded:,} non-clean excluded, "
                  f"{summary.skipped:,} skipped), {summary.steps} steps, final loss {summary.final_loss:.4f}, "
                  f"logit_scale {summary.logit_scale:.2f}; decode {summary.decode_seconds:.1f} s, "
                  f"train {summary.train_seconds:.1f} s -> {summary.out}", highlight=False)


@stage_command(teacher_app, "tiny", TinyTeacherConfig, group="teacher")
def teacher_tiny_cmd(*, cfg: TinyTeacherConfig):
    """Print the cached curate-tiny checkpoint's path, training it once (about 3 minutes) if missing."""
    from curate.stages.teacher import TINY_TEACHER_TRAIN
    from curate.stages.teacher.tiny import ensure_tiny_teacher, tiny_teacher_path
    from curate.ui import sample_progress

    path = tiny_teacher_path(cfg.cache_dir)
    if path.is_file():
        print(path)
        return
    console.print(f"training the cached curate-tiny teacher once (about 3 minutes on 2 cores) -> {path}")
    with sample_progress("curate-tiny", total=TINY_TEACHER_TRAIN.steps, unit="steps") as bar:
        print(ensure_tiny_teacher(cfg, on_log=lambda entry: bar(entry["step"] - bar.done)))


# ---------------------------------------------------------------- embed

# Options the stages that run tasks share (embed, score, normsim, filter, export): one definition, the same help.
RANK_OPTION = typer.Option(None, help="This rank (default: SLURM_ARRAY_TASK_ID or 0).")
WORLD_SIZE_OPTION = typer.Option(None, "--world-size", help="Number of ranks (default: SLURM_ARRAY_TASK_COUNT or 1).")
EXECUTOR_OPTION = typer.Option("local", help="local or ray.")
RETRIES_OPTION = typer.Option(1, help="Retries per failed task.")
RAY_ADDRESS_OPTION = typer.Option(None, "--ray-address", help="auto or HOST:PORT; local Ray when absent.")
MAP_WORKERS_OPTION = typer.Option(1, help="local executor: processes running the map tasks (1: this process).")


@stage_command(app, "embed", EmbedConfig, embed_stage.RUN_OPTIONS)
def embed_cmd(
    shards: List[str] = typer.Argument(..., help="Directory, glob, brace pattern (data/{00000..00009}.tar), fsspec URL "
                                                 "or pipe:COMMAND; with --images-only also an ImageFolder DIR/CLASS/*.jpg."),
    out: Path = typer.Option(..., "--out", help="Embedding directory: one <stem>.parquet per shard."),
    *, cfg: EmbedConfig, opts: RunOptions,
):
    """Embed tar shards with a CLIP teacher into L2-normalised fp16 Parquet tables keyed by uid."""
    from curate.stages.embed import entry as embed
    from curate.ui import embed_summary_line, embed_summary_table, sample_progress

    on_interrupt(lambda: f"{finished_units(out, 'embed')} shard(s) finished in {out}")
    with sample_progress("embed") as advance:
        result = embed.run(shards, out, cfg, opts, progress=advance)
    if result.shards or result.failures:
        console.print(embed_summary_table(result))
    console.print(embed_summary_line(result), highlight=False)
    if result.redone:
        console.print(f"--overwrite: {len(result.redone)} shard(s) made with other parameters were embedded again")
    if result.random_init:
        console.print("[bold yellow]warning[/]: --pretrained none: a randomly initialised teacher; these embeddings "
                      "carry no meaning (recorded as random_init in the tables' metadata)", highlight=False)
    if result.content_uids:
        console.print(f"[yellow]note[/]: {result.content_uids:,} of {result.embedded:,} uids were derived from "
                      "content (no valid `uid` in the sample's .json, as in img2dataset's default shards). "
                      "DataComp's resharder finds samples by that field, so it cannot copy these from the input "
                      "shards; `curate export` writes the uid into each exported sample's .json.", highlight=False)
    if result.failures:
        names = ", ".join(f["task"] for f in result.failures)
        raise CurateError(f"embed: {len(result.failures)} task(s) failed after retries ({names}); "
                          f"finished shards are kept, rerun to retry. First error: {result.failures[0]['error'].splitlines()[-1]}")

# ---------------------------------------------------------------- score / normsim

def ranks_pending_line(command: str, tasks: dict, out: Path) -> str:
    """What a rank says when its map tasks are done but other ranks' are not (the last one writes `out`)."""
    return (f"[bold]{command}[/]: rank {tasks['rank']} of {tasks['world_size']} done ({tasks['ran']} map tasks run, "
            f"{tasks['already_done']} already done); {tasks['missing']} of {tasks['tasks']} tasks still missing. "
            f"The last rank to finish (or this command rerun without --rank/--world-size) writes {out}")


def map_tasks_note(tasks: dict) -> str:
    return (f"{tasks['tasks']} map tasks ({tasks['ran']} run here, {tasks['tasks'] - tasks['ran']} done before or "
            "by other ranks)")


def rate_line(command: str, result, detail: str) -> str:
    rows, seconds, rate, out = ((result[k] for k in ("rows", "seconds", "rows_per_s", "out")) if isinstance(result, dict)
                                else (result.rows, result.seconds, result.rows_per_s, result.out))
    return f"[bold]{command}[/]: {rows:,} rows in {seconds:.2f} s ({rate:,.0f} rows/s), {detail} -> {out}"


@stage_command(app, "score", ScoreConfig, score_stage.RUN_OPTIONS)
def score_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory made by `curate embed` (or one table)."),
    out: Path = typer.Option(..., "--out", help="Output Parquet: uid + one float32 column per metric."),
    *, cfg: ScoreConfig, opts: RunOptions,
):
    """CLIPScore and negCLIPLoss (Wang et al. 2024, Eq. 2) of every sample, exact and seeded.

    With --rank/--world-size (or a Slurm array), --executor ray, --workers N or --tasks T, negclip runs as
    map tasks with completion markers under OUT.parts/; the rank that finishes last writes the table,
    byte-identical to a one-process run.
    """
    from curate.stages.score import entry as score
    from curate.ui import sample_progress

    on_interrupt(lambda: "finished negclip map tasks (if any ran as tasks) are kept beside the output")
    with sample_progress("score") as advance:
        result = score.run(emb, out, cfg, opts, progress=advance)
    params = result.params
    tasks_info = result.negclip_tasks
    if result.out is None:
        console.print(ranks_pending_line("score", tasks_info, out), highlight=False)
        return
    detail = ", ".join(result.metrics)
    if "negclip" in result.metrics:
        detail += f" (K={params['k']}, B={params['effective_batch_size']}, seed={params['seed']})"
    if tasks_info:
        detail += ", " + map_tasks_note(tasks_info)
    console.print(rate_line("score", result, detail + f" on {params['device']}"), highlight=False)


@stage_command(app, "normsim", NormsimConfig, normsim_stage.RUN_OPTIONS)
def normsim_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory made by `curate embed` (or one table)."),
    out: Path = typer.Option(..., "--out", help="Output Parquet: uid + normsim_inf | normsim_2 | normsim_2d."),
    *, cfg: NormsimConfig, opts: RunOptions,
):
    """NormSim_p (Wang et al. 2024, Eq. 3) of every sample's image embedding against a target set.

    With --rank/--world-size (or a Slurm array), --executor ray, --workers N or --tasks T, p=inf and p=2 run
    as map tasks (runs of whole tables) with completion markers under OUT.parts/; the rank that finishes
    last writes the table, byte-identical to a one-process run. p=2d runs the reference's nested schedule
    (NormSim_2-D: T iterations removing equal chunks, each against a subsample's second moment) as one
    driver running rounds of map tasks: in this process, or spread by --executor ray / --workers N, with the
    same bytes; it refuses a rank split. Its column orders the pool so that `curate filter --keep
    normsim_2d:F` keeps exactly the run's subset at its --final-fraction F.
    """
    from curate.stages.normsim import entry as normsim
    from curate.ui import sample_progress

    with sample_progress("normsim") as advance:
        result = normsim.run(emb, out, cfg, opts, progress=advance)
    tasks_info = result.normsim_tasks
    if result.out is None:
        console.print(ranks_pending_line("normsim", tasks_info, out), highlight=False)
        return
    params = result.params
    detail = f"{result.column} vs {params.get('target')}"
    if "target_rows" in params:
        kind = {"image_embeddings": "image embeddings", "text_prompts": "class prompts"}.get(params.get("target_kind"))
        detail += f" ({params['target_rows']:,} rows{', ' + kind if kind else ''})"
    if params.get("index") == "ivf":
        detail += f", ivf nlist={params['nlist']} nprobe={params['nprobe']}"
    if result.missing:
        detail += f", {result.missing:,} rows with no IVF candidate (NaN)"
    if tasks_info:
        detail += ", " + map_tasks_note(tasks_info)
    if result.note:
        detail += f"; {result.note}"
    console.print(rate_line("normsim", result, detail), highlight=False)


# ---------------------------------------------------------------- filter / export / import

import_app = typer.Typer(no_args_is_help=True, help="Convert other tools' files into curate's tables.")
app.add_typer(import_app, name="import")


@stage_command(app, "filter", FilterConfig, filter_stage.RUN_OPTIONS)
def filter_cmd(
    tables: List[Path] = typer.Argument(..., help="Score tables (Parquet: uid + metric columns) or directories of "
                                                  "them; joined on uid. The first one sets the pool order. Files in "
                                                  "a row with the same columns (a shell glob) are one table."),
    out: Path = typer.Option(..., "--out", help="Subset directory: uids.npy (DataComp), kept.parquet, stats.json."),
    *, cfg: FilterConfig, opts: RunOptions,
):
    """Select a subset: drops (duplicates, contaminated), thresholds, exact top fractions by score, then uid lists
    (∩ --include-uids, ∪ --union, − --exclude-uids); writes DataComp's uid file.

    With --executor ray, --workers N or --tasks T the selection runs as map tasks over row-aligned tables
    (a radix select per --keep, a few rounds each) without holding the score columns, with the same
    outputs. --rank/--world-size are refused: one driver process submits every round's tasks.
    """
    from rich.table import Table

    from curate.stages.filter import entry as filter_entry
    from curate.stages.filter.uid_sets import not_in_pool_note

    result = filter_entry.run(tables, out, cfg, opts)
    table = Table(title=f"filter ({result.mode}) of a pool of {result.pool}")
    for column in ("step", "rows ranked", "kept", "removed", "cut score", "NaN"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for s in result.steps:
        if s.step == "keep":
            label = f"--keep {s.metric}:{s.fraction}"
        elif s.step in ("min", "max"):
            label = f"--{s.step} {s.metric}:{s.value:g}"
        elif s.uids is not None:  # a uid list: rows in the subset before and after it
            label = f"--{s.step.replace('_', '-')} {s.uids}"
        else:  # a drop step's table is in stats.json
            label = f"--{s.step.replace('_', '-')} ({s.metric} {'>=' if s.step == 'drop_duplicates' else '<='} " \
                    f"{s.value:g})"
        cut = f"{s.threshold:.6g}" if s.threshold is not None else ""
        kept = f"{s.kept} (+{s.added})" if s.added else str(s.kept)
        table.add_row(label, str(s.ranked), kept, str(s.removed), cut, str(s.nan))
    console.print(table)
    for line in not_in_pool_note(result.steps):
        console.print(f"note: {line} (counted in stats.json)")
    console.print(f"kept {result.kept} of {result.pool} ({result.kept / result.pool:.1%}) -> {result.out_dir}")


@stage_command(app, "export", ExportConfig, export_stage.RUN_OPTIONS)
def export_cmd(
    shards: List[str] = typer.Argument(..., help="Input shards: directory, glob, brace pattern or fsspec URL."),
    subset: Path = typer.Option(..., "--subset", help="A `curate filter` output directory or a DataComp uids .npy."),
    out: Path = typer.Option(..., "--out", help="Output directory for NNNNN.tar shards."),
    *, cfg: ExportConfig, opts: RunOptions,
):
    """Copy the subset's samples (all members, input order) into new tar shards.

    With --executor ray, --workers N or --tasks T the export runs as two passes of map tasks (find the kept
    samples per input shard, then write the output tars) around a small reduce, with the same outputs.
    """
    from curate.stages.export import entry as export_entry
    from curate.stages.export.common import ERRORS, MISSING
    from curate.ui import sample_progress

    on_interrupt(lambda: f"{len(list(out.glob('*.tar')))} finished tar(s) in {out} are kept")
    with sample_progress("export") as advance:
        report = export_entry.run(shards, subset, out, cfg, opts, progress=advance)
    if report.noop:
        console.print(f"{out}: export already complete ({report.written} samples); nothing to do")
        return
    reused = f" ({report.tars_reused} finished tars of an earlier run kept)" if report.tars_reused else ""
    console.print(f"exported {report.written} of the subset's {report.subset} samples into "
                  f"{len(report.shards)} shards in {out}{reused}")
    if report.missing:
        console.print(f"[yellow]{report.missing} subset uids were not found in the shards[/]: {out / MISSING}")
    if report.problems:
        console.print(f"[yellow]{report.problems} problems recorded[/] in {out / ERRORS}")


@stage_command(import_app, "datacomp", ImportDatacompConfig, group="import")
def import_datacomp_cmd(
    metadata_dir: Path = typer.Argument(..., help="DataComp metadata: NNNNNNNN.parquet next to NNNNNNNN.npz."),
    out: Path = typer.Option(..., "--out", help="Embedding directory for `curate score` / `curate normsim`."),
    *, cfg: ImportDatacompConfig,
):
    """Turn DataComp's released embeddings into curate embedding tables (no GPU needed to score them)."""
    from curate.stages.import_datacomp import entry as import_datacomp

    report = import_datacomp.run(metadata_dir, out, cfg)
    console.print(f"imported {report.imported} shards ({report.rows} rows, {report.skipped_rows} skipped and "
                  f"recorded), {report.skipped_done} already done -> {out}")


# ---------------------------------------------------------------- clones / pcme / eval

pcme_app = typer.Typer(no_args_is_help=True, help="Match probability and uncertainty (PCME / PCME++ tiers).")
app.add_typer(pcme_app, name="pcme")


def _truth_lines(check: dict) -> None:
    for name, value in check.items():
        if isinstance(value, dict) and "f1" in value:
            console.print(f"  {name}: precision {value['precision']:.3f}, recall {value['recall']:.3f}, "
                          f"F1 {value['f1']:.3f}", highlight=False)
        elif isinstance(value, float):
            console.print(f"  {name}: {value:.4f}", highlight=False)
        elif isinstance(value, dict) and all(isinstance(v, float) for v in value.values()):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in value.items())
            console.print(f"  {name}: {parts}", highlight=False)
        else:
            console.print(f"  {name}: {value}", highlight=False)


@stage_command(app, "clones", ClonesConfig)
def clones_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory made by `curate embed` (or one table)."),
    out: Path = typer.Option(..., "--out", help="Output Parquet: uid + AdaCL clone, k-NN, tier-0 and duplicate "
                                                 "columns."),
    *, cfg: ClonesConfig,
):
    """Clone negatives: AdaCL's discovery on seeded batches (clone_prob, partner, anchor), a pool-wide k-NN
    extension, tier-0 uncertainty and duplicates."""
    from curate.stages.clones import entry as clones

    s = clones.run(emb, out, cfg)
    anchor = s.batches["i2t"]["median_anchor_similarity"]
    anchor = "none" if anchor is None else f"{anchor:.4f}"
    console.print(f"[bold]clones[/]: {s.n:,} samples in {s.n_batches:,} batches of {s.batch_size:,}, "
                  f"{s.n_potential_clones:,} with clone_prob > 0.5 (median anchor similarity {anchor}), "
                  f"{s.n_duplicates:,} duplicates -> {out}", highlight=False)
    if s.truth_check is not None:
        _truth_lines(s.truth_check)


@stage_command(pcme_app, "calibrate", PcmeCalibrateConfig, group="pcme")
def pcme_calibrate_cmd(emb: Path = typer.Argument(..., help="Embedding directory."),
                       out: Path = typer.Option(..., "--out", help="Output Parquet: uid, similarity, p_match."),
                       *, cfg: PcmeCalibrateConfig):
    """Tier 1: fit p(match) = sigmoid(-a(2 - 2s) + b) by logistic regression, write p_match."""
    from curate.stages.pcme.entry import calibrate_p_match

    s = calibrate_p_match(emb, out, cfg)
    console.print(f"[bold]pcme calibrate[/]: a={s.a:.4f} b={s.b:.4f} from {s.n_pairs:,} positive and "
                  f"negative pairs -> {out}", highlight=False)
    if s.truth_check is not None:
        _truth_lines(s.truth_check)


@stage_command(pcme_app, "fit", PcmeFitConfig, group="pcme")
def pcme_fit_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory (frozen teacher embeddings)."),
    out: Path = typer.Option(..., "--out", help="Heads checkpoint (.pt, tensors and plain types only)."),
    *, cfg: PcmeFitConfig,
):
    """Tier 2: train μ / log σ² heads per modality on frozen embeddings (PCME or PCME++ loss)."""
    from curate.stages.pcme.entry import fit_heads

    t = fit_heads(emb, out, cfg).train
    console.print(f"[bold]pcme fit[/]: {cfg.loss} loss {t['loss_curve'][0]:.4f} -> {t['final_loss']:.4f} in "
                  f"{t['steps']} steps on {t['n_train']:,} rows, a={t['a']:.3f} b={t['b']:.3f} -> {out}",
                  highlight=False)


@stage_command(pcme_app, "score", PcmeScoreConfig, group="pcme")
def pcme_score_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory."),
    heads: Path = typer.Option(..., "--heads", help="Checkpoint from `curate pcme fit`."),
    out: Path = typer.Option(..., "--out", help="Output Parquet: uid, p_match, csd, uncertainty_img, "
                             "uncertainty_txt, uncertainty."),
    *, cfg: PcmeScoreConfig,
):
    """Tier 2: match probability and per-modality uncertainty (mean σ²) of every sample."""
    from curate.stages.pcme.entry import p_match_and_uncertainty

    s = p_match_and_uncertainty(emb, heads, out, cfg)
    console.print(f"[bold]pcme score[/]: {cfg.estimator} p_match and uncertainties (a={s.a:.3f} b={s.b:.3f}) "
                  f"-> {out}", highlight=False)
    if s.truth_check is not None:
        _truth_lines(s.truth_check)


@stage_command(app, "eval", EvalConfig)
def eval_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory (a held-out split, or a student's embeddings)."),
    out: Path = typer.Option(..., "--out", help="Output JSON with every number."),
    *, cfg: EvalConfig,
):
    """Retrieval: R@1/5/10 both ways, RSUM, R-Precision, mAP@R and PMRP (ζ = 0, 1, 2)."""
    from curate.stages.evaluate import entry as evaluate

    result = evaluate.run(emb, out, cfg)
    Console().print(evaluate.retrieval_table(result))
    console.print(f"[bold]eval[/]: RSUM {result.rsum:.2f} -> {out}", highlight=False)

# ---------------------------------------------------------------- train / compare / report

@stage_command(app, "train", StudentConfig)
def train_cmd(
    source: str = typer.Argument(..., help="A `curate filter` subset directory (uids.npy; needs --corpus) or "
                                           "shards holding only the kept samples (`curate export` output)."),
    out: Path = typer.Option(..., "--out", help="Student directory: student.pt, train.json, curve.png "
                                               "(and eval.json with --heldout/--target)."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="Shards the subset was selected from (with a subset)."),
    heldout: Optional[str] = typer.Option(None, "--heldout", help="Held-out synth shards: retrieval R@1 after training."),
    target: Optional[str] = typer.Option(None, "--target", help="Synth target dir (classes.json): zero-shot top-1."),
    *, cfg: StudentConfig,
):
    """Train a small student CLIP from scratch on a subset, with a fixed budget of samples seen."""
    from curate.stages.train_student import entry as train

    every = max(1, cfg.steps // 10)

    def on_log(entry: dict) -> None:
        if entry["step"] % every == 0 or entry["step"] == cfg.steps:
            console.print(f"step {entry['step']}/{cfg.steps}: loss {entry['loss']:.4f}", highlight=False)

    record = train.run(source, out, cfg, corpus=corpus, heldout=heldout, target=target, on_log=on_log)
    budget = record.budget
    console.print(f"[bold]train[/]: {budget['train_pairs']} pairs, {budget['samples_seen']} samples seen "
                  f"({budget['steps']} x {budget['batch_size']}, {budget['epochs']:g} epochs) in "
                  f"{record.train_seconds:.1f} s -> {record.checkpoint}", highlight=False)
    if record.eval is not None:
        ev = record.eval
        if "zero_shot" in ev:
            console.print(f"zero-shot top-1 {ev['zero_shot']['top1']:.1f} % ({ev['zero_shot']['n']} images, "
                          f"chance {ev['zero_shot']['chance']:.1f} %)", highlight=False)
        if "retrieval" in ev:
            console.print(f"retrieval R@1 i2t {ev['retrieval']['i2t']['R@1']:.1f} %, t2i "
                          f"{ev['retrieval']['t2i']['R@1']:.1f} % ({ev['retrieval']['n_images']} pairs)", highlight=False)


@stage_command(app, "compare", CompareConfig)
def compare_cmd(
    corpus: Path = typer.Argument(..., help="A synth corpus (`curate synth`, with a target set in CORPUS/target)."),
    out: Path = typer.Option(..., "--out", help="Compare directory: compare.json, compare.md, curves.png, runs/, "
                                               "subsets/, and the chain's embeddings and scores (as `curate run` "
                                               "writes them)."),
    *, cfg: CompareConfig,
):
    """Train students on same-size subsets from each curation method and from random; tabulate vs ground truth."""
    from rich.markdown import Markdown

    from curate.compare import entry as compare
    from curate.ui import sample_progress

    result = compare.run(corpus, out, cfg, log=lambda message: console.print(message, highlight=False),
                         progress=lambda label: sample_progress(label))
    Console().print(Markdown((out / "compare.md").read_text()))
    console.print(f"[bold]compare[/]: {len(result.runs)} runs in {result.timings['total']:.0f} s -> "
                  f"{out / 'compare.json'}, {out / 'compare.md'}", highlight=False)

@stage_command(app, "report", ReportConfig)
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (what `curate run` wrote): scores, emb/, subsets/, ..."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output HTML file (default: RUN_DIR/report.html)."),
    scores: List[Path] = typer.Option([], "--scores", help="Score table or directory, repeatable "
                                      "(default: every RUN_DIR/*.parquet with a uid column)."),
    subset: List[Path] = typer.Option([], "--subset", help="`curate filter` output directory, repeatable "
                                      "(default: RUN_DIR/subsets/*/)."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Shards to read thumbnails from "
                                         "(default: RUN_DIR/corpus/*.tar)."),
    emb: Optional[Path] = typer.Option(None, "--emb", help="Embedding tables with the truth json (default: RUN_DIR/emb)."),
    *, cfg: ReportConfig,
):
    """One self-contained HTML page (no network, opens from disk): histograms, scatter, galleries, removal, compare."""
    from curate.stages.report import entry as report

    result = report.run(run_dir, out, cfg, scores=scores, subsets=subset, shards=shards, emb=emb)
    for note in result.notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False)
    console.print(f"[bold]report[/]: {', '.join(result.sections) or 'no section'} "
                  f"({result.bytes / 1024:,.0f} KiB, {result.seconds:.1f} s) -> {result.out}", highlight=False)

# ---------------------------------------------------------------- dedup

@stage_command(app, "dedup", DedupConfig, dedup_stage.RUN_OPTIONS)
def dedup_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory made by `curate embed` (or one table)."),
    out: Path = typer.Option(..., "--out", help="Output Parquet: uid, cluster, centroid_similarity, similarity, "
                                               "duplicate_of, semdedup_keep."),
    *, cfg: DedupConfig, opts: RunOptions,
):
    """Semantic deduplication (SemDeDup): k-means on the image embeddings, then near-duplicates within clusters.

    The summary gives the cluster sizes and the kept fraction at every --eps, to choose k and ε in one run;
    `curate filter --drop-duplicates OUT` keeps the non-duplicates.
    """
    from curate.stages.dedup.entry import run
    from curate.ui import sample_progress

    with sample_progress("dedup") as advance:
        result = run(emb, out, cfg, opts, progress=advance)
    sizes = result.cluster_sizes
    console.print(f"[bold]dedup[/]: {result.rows:,} rows in {result.clusters:,} clusters (sizes: median "
                  f"{sizes['median']:g}, p90 {sizes['p90']:g}, p99 {sizes['p99']:g}, max {sizes['max']:,}; "
                  f"{sizes['singletons']:,} singletons, {sizes['empty']:,} empty), {result.seconds:.1f} s -> {out}",
                  highlight=False)
    for eps, kept in result.kept.items():
        console.print(f"  eps {eps}: keeps {kept:,} of {result.rows:,} ({kept / result.rows:.1%}), drops "
                      f"{result.rows - kept:,} as semantic duplicates", highlight=False)


# ---------------------------------------------------------------- decontaminate

@stage_command(app, "decontaminate", DecontaminateConfig, decontaminate_stage.RUN_OPTIONS)
def decontaminate_cmd(
    emb: Path = typer.Argument(..., help="Embedding directory of the pool (made by `curate embed`)."),
    against: List[Path] = typer.Option(..., "--against", help="Evaluation or target images: an embedding directory "
                                       "(e.g. `curate embed EVAL --images-only`) or a .npy/.pt/.parquet matrix; "
                                       "repeat for several sets."),
    out: Path = typer.Option(..., "--out", help="Output Parquet: uid, nearest_uid, nearest_set, similarity, "
                                               "contaminated."),
    *, cfg: DecontaminateConfig, opts: RunOptions,
):
    """Flag pool samples whose image is (near) an evaluation image, so a selection never trains on its test set."""
    from curate.stages.decontaminate.entry import run
    from curate.ui import sample_progress

    with sample_progress("decontaminate") as advance:
        result = run(emb, against, out, cfg, opts, progress=advance)
    if result.out is None:
        console.print(ranks_pending_line("decontaminate", result.tasks, out), highlight=False)
        return
    console.print(f"[bold]decontaminate[/]: {result.contaminated:,} of {result.rows:,} pool samples within cosine "
                  f"{cfg.threshold:g} of one of {result.against_rows:,} evaluation images, {result.seconds:.1f} s "
                  f"-> {out}", highlight=False)
    console.print("  nearest-image similarity of the pool (choose --threshold where copies separate from the rest):",
                  highlight=False)
    for low, high, count in result.histogram:
        label = f"[{max(low, -1.0):.2f}, {min(high, 1.0):.2f}{']' if high > 1 else ')'}"  # the open ends read as ±1
        console.print(f"    {label:>14} {count:>10,}", highlight=False)


# ---------------------------------------------------------------- run

@app.command("run")
def run_cmd(
    recipe: Path = typer.Argument(..., help="A recipe TOML file (see examples/recipes/)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; run nothing."),
    force: bool = typer.Option(False, "--force", help="Rerun steps even when their run marker says done."),
):
    """Run a whole chain described by one recipe file; reruns skip finished steps."""
    from rich.table import Table

    from curate.recipe import Markers, execute, load_recipe, plan, step_status

    spec = load_recipe(recipe)
    if dry_run:
        markers = Markers(spec["run"]["dir"], "run")
        table = Table(title=f"plan of {recipe} (run dir {spec['run']['dir']})")
        for col in ("step", "inputs", "outputs", "status"):
            table.add_column(col)
        for step in plan(spec):
            table.add_row(step.name, "\n".join(step.inputs), "\n".join(step.outputs), step_status(step, markers))
        Console().print(table)
        return
    from curate.ui import sample_progress

    records = execute(spec, echo=console.print, force=force, progress=lambda label: sample_progress(label))
    from curate.ui import truth_rich_table

    for r in records:
        if r.get("result", {}).get("truth"):
            Console().print(truth_rich_table(r["result"]["truth"]))
        if r.get("result", {}).get("report"):
            Console().print(f"report: {r['result']['report']}")
    console.print(f"[green]done[/]: {sum(r['status'] == 'done' for r in records)} steps run, "
                  f"{sum(r['status'] != 'done' for r in records)} skipped")


if __name__ == "__main__":
    main()
