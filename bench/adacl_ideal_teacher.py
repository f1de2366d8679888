"""Is it AdaCL or the teacher? `curate clones` on embeddings of an *ideal* teacher built from the world's truth.

`curate compare` finds AdaCL's clone flags blind on the tiny teacher (F1 0.61 against semantic groups, every
sample flagged; docs/world.md). This script asks whether the flags work when the teacher does: each attribute value
of the world gets a fixed random unit vector; a picture's image embedding is the normalised sum of its seven
attributes' vectors plus layout noise (so a semantic twin is close but not equal, a duplicate equal), a caption's
text embedding the normalised sum of the attributes it names (a generic caption and a noise image: random vectors),
logit scale 100 as OpenAI CLIP's. Then `curate clones` with its defaults, and the flags scored against the truth as
`curate compare` scores them.

    PYTHONPATH=. python bench/adacl_ideal_teacher.py CORPUS [--layout-noise 0.3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from curate.compare.quality import clone_quality, group_sizes, truth_from_fields
from curate.compare.signals import TRUTH_FIELDS
from curate.io.shards import expand_shards, iter_shard
from curate.io.tables import TeacherInfo, build_embedding_table, write_table_atomic
from curate.stages.clones import ClonesConfig
from curate.stages.clones import entry as clones
from curate.stages.synth.world import WORLD

DIM = 128


def ideal_embeddings(metas: list[dict], layout_noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = {(attr, str(value)): v / np.linalg.norm(v)
               for attr, values in WORLD.attribute_values.items() for value in values
               for v in [rng.standard_normal(DIM)]}

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x)

    images, texts = [], []
    layout = np.random.default_rng(seed + 1)
    for m in metas:
        picture = sum(vectors[(a, str(v))] for a, v in m["attributes"].items())
        if m["truth"] == "noise_image":
            picture = rng.standard_normal(DIM)
        elif m["truth"] == "duplicate":
            picture = None  # the same bytes: the original's embedding, filled in below
        images.append(None if picture is None else unit(picture + layout_noise * layout.standard_normal(DIM)))
        named = m.get("caption_attributes") or {}
        texts.append(unit(sum(vectors[(a, str(v))] for a, v in named.items())) if named
                     else unit(rng.standard_normal(DIM)))
    index = {m["uid"]: i for i, m in enumerate(metas)}
    for i, m in enumerate(metas):
        if images[i] is None:
            images[i] = images[index[m["duplicate_of"]]] if m.get("duplicate_of") in index else \
                unit(rng.standard_normal(DIM))
    return np.stack(images).astype(np.float32), np.stack(texts).astype(np.float32)


def caption_clones(metas: list[dict]) -> np.ndarray:
    """AdaCL's own notion, as truth: sample i has a clone negative when another sample's picture has every attribute
    i's caption names (for "a circle", every other circle). Generic captions name nothing: every picture fits."""
    attrs = list(WORLD.attribute_values)
    codes = np.asarray([[str(m["attributes"][a]) for a in attrs] for m in metas], dtype=object)
    fits = np.zeros(len(metas), dtype=bool)
    for i, m in enumerate(metas):
        named = m.get("caption_attributes") or {}
        match = np.ones(len(metas), dtype=bool)
        for a, v in named.items():
            match &= codes[:, attrs.index(a)] == str(v)
        match[i] = False
        fits[i] = match.any()
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--layout-noise", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    metas = [json.loads(raw.members["json"]) for url in expand_shards(args.corpus)
             for raw in iter_shard(url, lambda key, reason: None)]
    image, text = ideal_embeddings(metas, args.layout_noise, args.seed)
    truth = truth_from_fields({name: [m.get(name) for m in metas] for name in TRUTH_FIELDS})
    with tempfile.TemporaryDirectory() as tmp:
        emb = Path(tmp) / "emb"
        emb.mkdir()
        table = build_embedding_table([m["uid"] for m in metas], [m.get("key", "") for m in metas],
                                      [""] * len(metas), image, text)
        write_table_atomic(table, emb / "00000.parquet",
                           meta={"teacher": TeacherInfo("ideal", "truth", DIM, 100.0).to_dict()})
        clones.run(emb, Path(tmp) / "clones.parquet", ClonesConfig())
        import pyarrow.parquet as pq

        result = pq.read_table(Path(tmp) / "clones.parquet", columns=["clone_prob", "clone_prob_t2i", "clone_gap"])
        prob_i2t, prob_t2i = result.column("clone_prob").to_numpy(), result.column("clone_prob_t2i").to_numpy()
        flags = clones.flag_clones(prob_i2t, prob_t2i)
        gap = result.column("clone_gap").to_numpy()
    quality = clone_quality(flags, truth)
    clean = (image * text).sum(1)[truth.kind == "clean"]
    print(f"ideal teacher ({len(metas):,} pairs, layout noise {args.layout_noise}): clean pair cosine median "
          f"{np.median(clean):.3f}; own caption first for {100 * np.mean(gap > 0):.1f} % of samples")
    print(f"AdaCL clone flags vs semantic groups: precision {quality['precision']:.3f}, recall {quality['recall']:.3f}, "
          f"F1 {quality['f1']:.3f}; flagged {quality['flagged']:,}, true clones {quality['true_clones']:,}")
    from curate.metrics.clones import precision_recall_f1

    fits = caption_clones(metas)
    by_caption = precision_recall_f1(flags, fits)
    print(f"  vs caption clones (another picture has every attribute the caption names; {100 * fits.mean():.1f} % "
          f"of samples): precision {by_caption['precision']:.3f}, recall {by_caption['recall']:.3f}, "
          f"F1 {by_caption['f1']:.3f}")
    from curate.metrics.pcme import binary_roc_auc

    print(f"  ranking, not the 0.5 cut: ROC-AUC of clone_prob for caption clones i2t "
          f"{binary_roc_auc(np.nan_to_num(prob_i2t), fits):.3f}, t2i {binary_roc_auc(np.nan_to_num(prob_t2i), fits):.3f}; "
          f"for semantic groups i2t {binary_roc_auc(np.nan_to_num(prob_i2t), group_sizes(truth.group) >= 2):.3f}")
    specific = truth.specificity >= 6
    if specific.any():
        narrow = precision_recall_f1(flags[specific], fits[specific])
        print(f"  the same on captions naming >= 6 attributes ({int(specific.sum()):,}; {100 * fits[specific].mean():.1f} % "
              f"have a caption clone): precision {narrow['precision']:.3f}, recall {narrow['recall']:.3f}, "
              f"F1 {narrow['f1']:.3f}, flagged {100 * flags[specific].mean():.1f} %")
    injected = quality["injected"]
    print(f"  vs injected clone + duplicate + semantic_twin: precision {injected['precision']:.3f}, "
          f"recall {injected['recall']:.3f}, F1 {injected['f1']:.3f}")


if __name__ == "__main__":
    main()
