"""The world's control, in a smaller form than the one the docs report at --quick size: students trained on the
oracle's subset (the ground truth: correct pairs, one per meaning, target family first) beat students trained on a
random subset of the same size on the target task, with the quick preset's budget.

This is what makes the synthetic world a test bed for curation: if the best possible subset did not train a better
student than a random one, no curation method could show anything. The bound here (10 points, 2 seeds, a 3,000-pair
pool) is looser than the docs' (15 points at the demo's 4,000 pairs, 3 seeds): training on another CPU may differ in
its last bits, and a smaller pool leaves less room.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from curate.compare import PRESETS
from curate.compare.quality import truth_from_fields
from curate.compare.signals import TRUTH_FIELDS
from curate.compare.tables import oracle_rows, random_rows, subset_size
from curate.io.shards import expand_shards, iter_shard
from curate.stages.train_student import StudentConfig
from conftest import synth_corpus


@pytest.mark.slow
def test_oracle_subset_trains_a_better_target_student_than_random(tmp_path):
    from curate.stages.train_student.data import load_pairs
    from curate.stages.train_student.evaluation import evaluate_model, load_eval_data
    from curate.stages.train_student.training import student_transforms, train_on_pairs

    synth_corpus(tmp_path / "pool", samples=3000, shard_size=3000, seed=0, corrupt=0.3, target_samples=0)
    synth_corpus(tmp_path / "heldout", samples=50, shard_size=50, seed=7919, corrupt=0.0, target_samples=200)
    metas = [json.loads(raw.members["json"]) for url in expand_shards(str(tmp_path / "pool"))
             for raw in iter_shard(url, lambda key, reason: None)]
    truth = truth_from_fields({name: [m.get(name) for m in metas] for name in TRUTH_FIELDS})
    uids = [m["uid"] for m in metas]
    k = subset_size(0.2, len(uids))

    preprocess, tokenizer = student_transforms("curate-student")
    pairs = load_pairs(str(tmp_path / "pool"), preprocess, tokenizer)
    assert pairs.uids == uids
    eval_data = load_eval_data(preprocess, tokenizer, str(tmp_path / "heldout"), str(tmp_path / "heldout" / "target"))
    quick = PRESETS["quick"]
    accuracy: dict[str, list[float]] = {"oracle": [], "random": []}
    for seed in (0, 1):
        for name, rows in (("oracle", oracle_rows(truth, k)), ("random", random_rows(len(uids), k, seed))):
            config = StudentConfig(steps=quick["steps"], batch_size=quick["batch_size"], seed=seed, threads=1,
                                   device="cpu")
            trained = train_on_pairs(pairs.select([uids[i] for i in rows]), config)
            result = evaluate_model(trained.model, None, eval_data)
            accuracy[name].append(result["zero_shot"]["top1"])
    chance = 100.0 / len(eval_data.class_names)
    oracle, random = np.mean(accuracy["oracle"]), np.mean(accuracy["random"])
    print(f"zero-shot: oracle {accuracy['oracle']}, random {accuracy['random']} (chance {chance:.1f} %)")
    assert oracle >= 2 * chance, accuracy
    assert oracle - random >= 10.0, accuracy
