"""Embed: `curate embed` (ViT-B-32, random init) vs the bare model forward on pre-decoded tensors.

Corpus: `curate synth` shards with 224-pixel JPEGs. Limit: the same teacher (`load_teacher`, same device,
precision and batch size) run on images already decoded, preprocessed and stacked in RAM and captions
already tokenised: `encode_image` + `encode_text` per batch and the copy of the embeddings to the host,
nothing else. Stage: `embed(...)` end to end: read tars, decode JPEGs in DataLoader workers, preprocess,
tokenise, the same forward passes, write the Parquet tables and markers.

Throughput is compared in steady state: from the end of the first batch to the end of the last (the
first batch pays one-off costs in both: kernel/primitive set-up, for the stage also the teacher load and
worker start-up). The stage's end-to-end throughput, teacher load included, is reported as well.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from common import compare

MODEL = "ViT-B-32"


def make_corpus_once(path: Path, samples: int, shards: int) -> Path:
    from curate.stages.synth import SynthConfig
    from curate.stages.synth import entry as synth

    manifest = path / "manifest.json"
    if not manifest.exists() or '"complete": true' not in manifest.read_text():
        shutil.rmtree(path, ignore_errors=True)
        synth.run(path, SynthConfig(samples=samples, shard_size=-(-samples // shards), seed=0, corrupt=0.2,
                                    target_samples=0, image_size=224))
    return path


def predecode(corpus: Path, teacher) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample decoded, preprocessed and tokenised, as the stage's workers would (not timed)."""
    from curate.io.shards import SampleError, decode_sample, expand_shards, iter_shard

    size = teacher.model.visual.image_size
    size = max(size) if isinstance(size, (tuple, list)) else size
    images, captions = [], []
    for url in expand_shards(str(corpus)):
        for raw in iter_shard(url, lambda key, reason: None):
            try:
                s = decode_sample(raw, int(size))
            except SampleError:
                continue
            images.append(teacher.preprocess(s.image))
            captions.append(s.caption)
    return torch.stack(images), teacher.tokenizer(captions)


def run(work: Path, samples: int, batch_size: int, workers: int, device: str, repeats: int, log=print) -> dict:
    from curate.models import load_teacher
    from curate.stages.embed import EmbedConfig
    from curate.stages.embed.entry import run as embed

    corpus = make_corpus_once(work / f"embed-corpus-{samples}", samples, shards=max(1, workers))
    teacher = load_teacher(MODEL, "none", device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch gives each worker one thread)
    decode_start = time.perf_counter()
    images, tokens = predecode(corpus, teacher)
    decode_seconds = time.perf_counter() - decode_start
    torch.set_num_threads(threads)
    n = len(images)
    if device == "cuda" or teacher.device.type == "cuda":
        images = images.pin_memory()
    timings: dict = {}

    def limit():
        ends = []
        for start in range(0, n, batch_size):
            img = teacher.encode_image(images[start:start + batch_size].to(teacher.device, non_blocking=True))
            txt = teacher.encode_text(tokens[start:start + batch_size].to(teacher.device, non_blocking=True))
            img.float().cpu(), txt.float().cpu()
            ends.append(time.perf_counter())
        timings["limit_ends"] = ends

    def stage():
        out = work / "embed-out"
        shutil.rmtree(out, ignore_errors=True)
        ends = []
        config = EmbedConfig(model=MODEL, pretrained="none", device=device, batch_size=batch_size,
                             workers=workers)
        start = time.perf_counter()
        summary = embed(str(corpus), out, config, progress=lambda rows: ends.append(time.perf_counter()))
        timings["stage_ends"] = ends + [time.perf_counter()]  # the last write and marker count too
        timings["stage_start"] = start
        timings["embedded"] = summary.embedded

    steady = {"stage": [], "limit": []}

    def record(kind: str, fn):
        def wrapped():
            fn()
            ends = timings[f"{kind}_ends"]
            # rows after the first batch / time after the first batch
            steady[kind].append((n - batch_size) / (ends[-1] - ends[0]))
        return wrapped

    comparison = compare(record("stage", stage), record("limit", limit), repeats, log, "embed")
    steady = {kind: rates[1:] for kind, rates in steady.items()}  # the first is compare's untimed warm-up
    best_stage, best_limit = max(steady["stage"]), max(steady["limit"])
    return {"model": MODEL, "device": str(teacher.device), "samples": n, "batch_size": batch_size,
            "workers": workers, "embedded": timings["embedded"], "torch_threads": torch.get_num_threads(),
            **comparison.as_dict(),
            "stage_steady_sps": steady["stage"], "limit_steady_sps": steady["limit"],
            "best_stage_steady_sps": best_stage, "best_limit_steady_sps": best_limit,
            "throughput_ratio": best_stage / best_limit,
            "decode_s_per_sample": decode_seconds / n,
            "stage_end_to_end_sps": n / comparison.best_stage,
            "limit_end_to_end_sps": n / comparison.best_limit}
