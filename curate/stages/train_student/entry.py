"""`curate train`'s entry: decode the kept samples, train with a fixed budget, save; evaluate when asked
(`run`)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from curate.config import check_config
from curate.errors import CurateError
from curate.io.atomic import write_text_atomic
from curate.stages.train_student import EVAL_JSON, StudentConfig, TrainStudentResult
from curate.stages.train_student.data import is_subset_spec, load_pairs, read_subset_uids
from curate.stages.train_student.evaluation import evaluate_model, load_eval_data
from curate.stages.train_student.training import save_student, student_transforms, train_on_pairs


def run(source: str, out_dir: str | Path, config: StudentConfig = StudentConfig(), corpus: str | None = None,
        heldout: str | None = None, target: str | None = None,
        on_log: Callable[[dict], None] | None = None) -> TrainStudentResult:
    """`curate train`: decode the kept samples of `source` (a subset of `corpus`, or shards), train, save into
    `out_dir`; evaluate when `heldout` (shards) or `target` (a synth target set) is given. `on_log(entry)`:
    every `config.log_every` steps."""
    from curate.models.teacher import resolve_device

    check_config(config)
    config = replace(config, device=str(resolve_device(config.device)))
    preprocess, tokenizer = student_transforms(config.model)
    started = time.perf_counter()
    if is_subset_spec(source):
        if corpus is None:
            raise CurateError(f"{source}: a subset holds uids only; give --corpus SHARDS (the shards it was "
                              "selected from) to read the images and captions")
        wanted = read_subset_uids(source)
        pairs = load_pairs(corpus, preprocess, tokenizer, set(wanted))
        missing = len(set(wanted)) - len(pairs.uids)
        if missing:
            raise CurateError(f"{source}: {missing} of the subset's {len(set(wanted))} uids are not usable samples "
                              f"of --corpus {corpus}; give the shards the subset was selected from")
        data = {"subset": str(source), "corpus": str(corpus)}
    else:
        if corpus is not None:
            raise CurateError(f"{source}: not a subset directory (no uids.npy), so --corpus is not used; give "
                              "either a subset with --corpus or the exported shards alone")
        pairs = load_pairs(source, preprocess, tokenizer)
        data = {"shards": str(source)}
    decode_seconds = time.perf_counter() - started
    data.update({"pairs": len(pairs.uids), "truth_counts": pairs.truth_counts(), "skipped": pairs.skipped,
                 "decode_seconds": round(decode_seconds, 3)})
    trained = train_on_pairs(pairs, config, on_log)
    record = save_student(trained, out_dir, data)
    if heldout is not None or target is not None:
        eval_data = load_eval_data(preprocess, tokenizer, heldout, target)
        result = evaluate_model(trained.model, trained.heads_state, eval_data, config.device)
        write_text_atomic(Path(out_dir) / EVAL_JSON, json.dumps(result, indent=2, sort_keys=True) + "\n")
        record["eval"] = result
    return TrainStudentResult(**record)
