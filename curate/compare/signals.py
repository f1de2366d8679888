"""The stages of `curate compare` that the recipe has no section for (PCME tier 1 and tier 2, SemDeDup,
decontamination), the derived score table and the filters that read them, each run once with a digest marker (a
rerun with the same inputs skips it); and the pool's ground truth."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from curate.compare import CompareConfig
from curate.compare.quality import PoolTruth, truth_from_fields
from curate.run.markers import Markers

MARKER_STAGE = "compare"
TRUTH_FIELDS = ("truth", "family", "concept_rank", "specificity", "semantic_group", "planted_copy")


@dataclass
class ExtraStep:
    name: str
    params: dict  # what the outputs depend on (with the pool's identity)
    outputs: list[str]
    run: Callable[[], None]

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_steps(steps: list[ExtraStep], out: Path, log: Callable[[str], None]) -> float:
    """Run the steps whose marker is missing or holds another digest (or whose outputs are gone); seconds spent."""
    markers = Markers(out, MARKER_STAGE)
    spent = 0.0
    for step in steps:
        name = step.name.replace(":", "--")
        if markers.is_done(name) and markers.info(name).get("digest") == step.digest \
                and all(Path(o).exists() for o in step.outputs):
            log(f"[dim]skip[/] {step.name}: done")
            continue
        log(f"[bold]run[/] {step.name} → {', '.join(step.outputs)}")
        started = time.perf_counter()
        step.run()
        seconds = time.perf_counter() - started
        spent += seconds
        markers.mark(name, {"digest": step.digest, "seconds": round(seconds, 3)})
    return spent


def signal_keeps(cfg: CompareConfig, fraction: str) -> dict[str, tuple[list[str], dict]]:
    """The filtered methods that read the tables made here: method -> (table names, filter options)."""
    return {
        "normsim_2d": (["normsim_2d.parquet"], {"keep": [f"normsim_2d:{fraction}"]}),
        "clone_flags": (["signals.parquet"], {"keep": [f"clone_free:{fraction}"]}),
        "pcme_p_match": (["pcme.parquet"], {"keep": [f"p_match:{fraction}"]}),
        "pcme_certainty": (["signals.parquet"], {"keep": [f"pcme_certainty:{fraction}"]}),
        "semdedup": (["dedup.parquet"], {"keep": [f"semdedup_keep:{fraction}"]}),
        "semdedup_negclip": (["scores.parquet", "dedup.parquet"],
                             {"min": ["semdedup_keep:1"], "keep": [f"negclip:{fraction}"]}),
    }


def extra_steps(emb: Path, target_emb: Path, out: Path, cfg: CompareConfig, fraction: str, identity: dict,
                device: str) -> list[ExtraStep]:
    """NormSim_2-D (down to F, no target); PCME calibrate, fit, score; dedup; decontaminate; signals.parquet; the
    filters of signal_keeps."""
    from curate.config import RunOptions
    from curate.stages.dedup import DedupConfig
    from curate.stages.decontaminate import DecontaminateConfig
    from curate.stages.filter import FilterConfig
    from curate.stages.normsim import NormsimConfig
    from curate.stages.pcme import PcmeCalibrateConfig, PcmeFitConfig, PcmeScoreConfig

    def at(name: str) -> str:
        return str(out / name)

    normsim_2d = NormsimConfig(target="none", p="2d", final_fraction=float(fraction))
    calibrate = PcmeCalibrateConfig()
    fit = PcmeFitConfig(steps=cfg.pcme_steps, device=device)
    score = PcmeScoreConfig(device=device)
    dedup = DedupConfig(eps=[cfg.dedup_eps])
    contamination = DecontaminateConfig(threshold=cfg.contamination_threshold)

    def run_normsim_2d():
        from curate.stages.normsim.entry import run
        run(emb, at("normsim_2d.parquet"), normsim_2d, RunOptions())

    def run_calibrate():
        from curate.stages.pcme.entry import calibrate_p_match
        calibrate_p_match(emb, at("pcme_calibrated.parquet"), calibrate)

    def run_fit():
        from curate.stages.pcme.entry import fit_heads
        fit_heads(emb, at("pcme_heads.pt"), fit)

    def run_score():
        from curate.stages.pcme.entry import p_match_and_uncertainty
        p_match_and_uncertainty(emb, at("pcme_heads.pt"), at("pcme.parquet"), score)

    def run_dedup():
        from curate.stages.dedup.entry import run
        run(emb, at("dedup.parquet"), dedup, RunOptions())

    def run_decontaminate():
        from curate.stages.decontaminate.entry import run
        run(emb, [target_emb], at("contamination.parquet"), contamination, RunOptions())

    def run_signals():
        write_signals(out)

    base = {"pool": identity}
    steps = [
        ExtraStep("normsim:2d", {**base, "cfg": normsim_2d}, [at("normsim_2d.parquet")], run_normsim_2d),
        ExtraStep("pcme:calibrate", {**base, "cfg": calibrate}, [at("pcme_calibrated.parquet")], run_calibrate),
        ExtraStep("pcme:fit", {**base, "cfg": fit}, [at("pcme_heads.pt")], run_fit),
        ExtraStep("pcme:score", {**base, "cfg": score, "fit": fit}, [at("pcme.parquet")], run_score),
        ExtraStep("dedup", {**base, "cfg": dedup}, [at("dedup.parquet")], run_dedup),
        ExtraStep("decontaminate", {**base, "cfg": contamination}, [at("contamination.parquet")], run_decontaminate),
        ExtraStep("signals", {**base, "fit": fit, "clones_batch": cfg.clones_batch, "version": 2},
                  [at("signals.parquet")], run_signals),
    ]
    upstream = {step.name: step.digest for step in steps}
    for method, (tables, options) in signal_keeps(cfg, fraction).items():
        subset = at(f"subsets/{method}")

        def run_filter(tables=tables, options=options, subset=subset):
            from curate.stages.filter.entry import run
            run([at(t) for t in tables], subset, FilterConfig(**options), RunOptions())
        steps.append(ExtraStep(f"filter:{method}", {**base, "tables": tables, "options": options, "upstream": upstream},
                               [subset], run_filter))
    return steps


def write_signals(out: Path) -> None:
    """signals.parquet: uid, clone_free = 1 unless AdaCL flags the sample (clone_prob > 0.5 in either direction,
    curate.stages.clones.entry.flag_clones), then 0 (a keep of it takes the unflagged samples by uid, i.e. a
    pseudo-random choice among them), and pcme_certainty = −uncertainty, in pool order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curate.io.tables import write_table_atomic
    from curate.stages.clones.entry import flag_clones

    clones = pq.read_table(out / "clones.parquet", columns=["uid", "clone_prob", "clone_prob_t2i"])
    pcme = pq.read_table(out / "pcme.parquet", columns=["uid", "uncertainty"])
    if clones.column("uid").to_pylist() != pcme.column("uid").to_pylist():
        raise ValueError("clones.parquet and pcme.parquet are not in one pool order")
    flagged = flag_clones(clones.column("clone_prob").to_numpy(zero_copy_only=False),
                          clones.column("clone_prob_t2i").to_numpy(zero_copy_only=False))
    table = pa.table({"uid": clones.column("uid"), "clone_free": pa.array((~flagged).astype(np.float64)),
                      "pcme_certainty": pa.array(-pcme.column("uncertainty").to_numpy(zero_copy_only=False),
                                                 pa.float64())})
    write_table_atomic(table, out / "signals.parquet", meta={"signals": {
        "clone_free": "0 where clones.parquet's clone_prob or clone_prob_t2i > 0.5 (AdaCL Algorithm 1), else 1",
        "pcme_certainty": "-uncertainty of pcme.parquet (mean sigma^2 of the PCME++ heads)"}})


def read_truth(pool) -> PoolTruth:
    """The ground truth of every pool row from the embedding tables' json column."""
    from curate.stages.common import pool_field

    return truth_from_fields({name: pool_field(pool, f"json:{name}") for name in TRUTH_FIELDS})


def read_column(path: Path, column: str, uids: list[str]) -> np.ndarray:
    """A table's column in the order of `uids` (float64, NaN where null)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["uid", column])
    values = dict(zip(table.column("uid").to_pylist(), table.column(column).to_pylist()))
    return np.asarray([np.nan if values.get(u) is None else float(values[u]) for u in uids], dtype=np.float64)
