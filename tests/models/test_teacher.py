"""Teachers: the factory (offline error, random init, local checkpoints), the training loop, the cached teacher."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from curate.errors import CurateError
from curate.models import create_model, load_teacher, resolve_device, save_checkpoint
from curate.models.teacher import LOCAL_CHECKPOINT_HINT, model_config
from curate.models.train import augment_batch, batch_indices, infonce_loss, train_clip, warmup_cosine


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting one half: the plain pairwise definition."""
    pos = np.asarray(positive, np.float64)[:, None]
    neg = np.asarray(negative, np.float64)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


# ---------------------------------------------------------------- factory

@pytest.mark.parametrize("offline_env", [False, True])
def test_offline_pretrained_tag_fails_fast_with_one_line(monkeypatch, offline_env):
    # No machine of ours reaches the hub; the probe is stubbed anyway so that a networked machine
    # does not start a 600 MB download here.
    import curate.models.teacher as teacher_module

    monkeypatch.setattr(teacher_module, "hub_reachable", lambda timeout=0: False)
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    with pytest.raises(CurateError) as err:
        load_teacher("ViT-B-32", "laion2b_s34b_b79k", device="cpu")
    elapsed = time.perf_counter() - started
    message = str(err.value)
    assert "\n" not in message
    assert "ViT-B-32/laion2b_s34b_b79k" in message and "cannot be downloaded" in message
    assert LOCAL_CHECKPOINT_HINT in message
    assert elapsed < 10, f"offline failure took {elapsed:.1f} s"


def test_hub_probe_gives_up_within_its_timeout():
    from curate.models.teacher import hub_reachable

    started = time.perf_counter()
    hub_reachable(timeout=1.0)
    assert time.perf_counter() - started < 1.5


def test_unknown_tag_and_unknown_model_are_user_errors():
    with pytest.raises(CurateError, match="not an open_clip tag"):
        load_teacher("ViT-B-32", "no-such-tag", device="cpu")
    with pytest.raises(CurateError, match="unknown model"):
        load_teacher("no-such-model", "none", device="cpu")
    with pytest.raises(CurateError, match="does not exist"):
        load_teacher("curate-tiny", "/nonexistent/weights.pt", device="cpu")
    with pytest.raises(CurateError, match="precision"):
        load_teacher("curate-tiny", "none", device="cpu", precision="fp8")


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(CurateError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(CurateError):
        resolve_device("tpu")


def test_curate_tiny_random_init_shapes_and_norms():
    teacher = load_teacher("curate-tiny", "none", device="cpu")
    cfg = model_config("curate-tiny")
    assert teacher.embed_dim == cfg["embed_dim"] == teacher.info.embed_dim
    assert teacher.info.model == "curate-tiny" and teacher.info.pretrained == "none"
    assert math.isclose(teacher.logit_scale, 1 / 0.07, rel_tol=1e-5)
    assert not teacher.model.training
    images = torch.stack([teacher.preprocess(Image.new("RGB", (w, h), (200, 30, 30)))
                          for w, h in [(64, 64), (100, 40), (17, 90)]])
    assert images.shape == (3, 3, 64, 64)  # the eval transform resizes to the tower's 64 px
    tokens = teacher.tokenizer(["a red circle", "two small blue squares on a striped background", "x"])
    assert tokens.dtype == torch.long and tokens.shape == (3, cfg["text_cfg"]["context_length"])
    img, txt = teacher.encode_image(images), teacher.encode_text(tokens)
    for emb in (img, txt):
        assert emb.dtype == torch.float32 and emb.shape == (3, teacher.embed_dim)
        assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    # `none` is a fixed random init: a second load embeds identically
    again = load_teacher("curate-tiny", "none", device="cpu")
    assert torch.equal(again.encode_image(images), img) and torch.equal(again.encode_text(tokens), txt)


def test_curate_student_is_no_bigger_than_tiny():
    tiny, student = create_model("curate-tiny"), create_model("curate-student")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(student) <= count(tiny)
    assert model_config("curate-student")["vision_cfg"]["image_size"] == 32


def test_vit_b32_random_init_builds():
    started = time.perf_counter()
    teacher = load_teacher("ViT-B-32", "none", device="cpu")
    assert teacher.embed_dim == 512 and teacher.context_length == 77
    emb = teacher.encode_image(torch.zeros(1, 3, 224, 224))
    assert emb.shape == (1, 512)
    assert time.perf_counter() - started < 30


# ---------------------------------------------------------------- local checkpoints

def test_checkpoint_round_trip_restores_weights_scale_and_metadata(tmp_path):
    torch.manual_seed(3)
    model = create_model("curate-tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(42.0))
    path = save_checkpoint(model, tmp_path / "t.pt", "curate-tiny", model_config("curate-tiny"),
                           {"training": {"corpus": "somewhere", "samples": 7}})
    teacher = load_teacher("curate-tiny", str(path), device="cpu")
    assert math.isclose(teacher.logit_scale, 42.0, rel_tol=1e-6)
    assert teacher.info.pretrained == str(path.resolve())
    assert teacher.checkpoint_meta["training"] == {"corpus": "somewhere", "samples": 7}
    images = torch.randn(2, 3, 64, 64)
    tokens = teacher.tokenizer(["a red circle", "a blue star"])
    expected_img, expected_txt = _reference_encode(model, images, tokens)
    assert torch.equal(teacher.encode_image(images), expected_img)
    assert torch.equal(teacher.encode_text(tokens), expected_txt)
    # the file is plain data: weights_only loading works without our code's help
    raw = torch.load(path, weights_only=True)
    assert raw["curate"]["model"] == "curate-tiny" and raw["curate"]["logit_scale"] == pytest.approx(42.0)
    with pytest.raises(CurateError, match="use --model curate-tiny"):
        load_teacher("curate-student", str(path), device="cpu")


def _reference_encode(model, images, tokens):
    """The original in-memory model, run the way a Teacher runs (eval, inference mode, normalised fp32)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # as in a Teacher: this selects the same (fused) attention kernels
    with torch.inference_mode():
        img = None if images is None else torch.nn.functional.normalize(model.encode_image(images).float(), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
    return img, txt


class _Payload:
    """A pickled class instance: exactly what weights_only=True must refuse."""


def test_pickle_bearing_checkpoint_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(CurateError) as err:
        load_teacher("curate-tiny", str(path), device="cpu")
    assert str(path.resolve()) in str(err.value) and "weights_only" in str(err.value)


def test_garbage_checkpoint_is_a_user_error(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CurateError, match="not a readable torch checkpoint"):
        load_teacher("curate-tiny", str(path), device="cpu")


def test_plain_open_clip_state_dict_loads(tmp_path):
    torch.manual_seed(5)
    model = create_model("curate-tiny").eval()
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    teacher = load_teacher("curate-tiny", str(path), device="cpu")
    tokens = teacher.tokenizer(["a green cross"])
    assert torch.equal(teacher.encode_text(tokens), _reference_encode(model, None, tokens)[1])


# ---------------------------------------------------------------- the training loop

def test_infonce_matches_a_plain_loop():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((5, 4))
    txt = rng.standard_normal((5, 4))
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    scale = 7.0
    expected = 0.0
    for i in range(5):
        row = [scale * float(img[i] @ txt[j]) for j in range(5)]
        col = [scale * float(img[j] @ txt[i]) for j in range(5)]
        expected += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        expected += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    expected /= 2 * 5
    got = infonce_loss(torch.tensor(img), torch.tensor(txt), torch.tensor(scale))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    # hand-checkable: two orthogonal matched pairs at scale s -> log(1 + e^-s)
    eye = torch.eye(2, dtype=torch.float64)
    assert infonce_loss(eye, eye, torch.tensor(3.0)).item() == pytest.approx(math.log(1 + math.exp(-3.0)))


def test_batches_are_seeded_epochs_without_repeats():
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = [next(it) for it in [batch_indices(10, 4, g1)] for _ in range(4)]
    b = [next(it) for it in [batch_indices(10, 4, g2)] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    first_epoch = torch.cat(a[:2])
    assert len(set(first_epoch.tolist())) == 8  # the remainder of 2 is dropped, no index twice in an epoch


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.0)


def test_augmentation_is_seeded_and_shape_preserving():
    images = torch.randn(6, 3, 16, 16)
    a = augment_batch(images, torch.Generator().manual_seed(4))
    b = augment_batch(images, torch.Generator().manual_seed(4))
    assert a.shape == images.shape and torch.equal(a, b)
    assert not torch.equal(a, images)


def _tiny_run(seed: int, loss="infonce"):
    torch.manual_seed(seed)
    model = create_model("curate-student")
    data = torch.Generator().manual_seed(99)
    size = model_config("curate-student")["vision_cfg"]["image_size"]
    images = torch.randn(24, 3, size, size, generator=data)
    tokens = torch.randint(1, 400, (24, model.context_length), generator=data)
    return train_clip(model, images, tokens, steps=6, batch_size=8, lr=1e-3, seed=seed, loss=loss,
                      log_every=1, augment=True, num_threads=1), model


def test_training_is_deterministic_for_a_seed():
    first, model_a = _tiny_run(7)
    second, model_b = _tiny_run(7)
    other, _ = _tiny_run(8)
    assert first == second
    assert [e["step"] for e in first] == list(range(1, 7))
    assert set(first[0]) >= {"step", "loss", "lr", "logit_scale"}
    assert all(torch.equal(p, q) for p, q in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert [e["loss"] for e in first] != [e["loss"] for e in other]


def test_pluggable_loss_hooks_are_called():
    calls = {"after": 0}

    class Objective:
        def __init__(self):
            self.temperature_bias = torch.nn.Parameter(torch.zeros(()))

        def parameters(self):
            return [self.temperature_bias]

        def __call__(self, img, txt, logit_scale):
            return infonce_loss(img, txt, logit_scale) + self.temperature_bias ** 2

        def after_step(self, img, txt, step):
            assert not img.requires_grad and img.shape == txt.shape
            calls["after"] += 1

        def extra_log(self):
            return {"bias": float(self.temperature_bias.detach())}

    from curate.models.train import LOSSES, register_loss

    register_loss("test-objective", lambda **kw: Objective())
    try:
        history, _ = _tiny_run(1, loss="test-objective")
    finally:
        LOSSES.pop("test-objective")
    assert calls["after"] == 6 and "bias" in history[-1]
    with pytest.raises(CurateError, match="unknown loss"):
        _tiny_run(1, loss="no-such-loss")


def test_teacher_train_stage_on_a_tiny_corpus(tmp_path):
    from conftest import synth_corpus
    from curate.stages.teacher import TeacherTrainConfig
    from curate.stages.teacher.entry import run as teacher_run

    corpus = tmp_path / "corpus"
    synth_corpus(corpus, samples=40, shard_size=20, seed=5, corrupt=0.25, target_samples=0)
    cfg = TeacherTrainConfig(model="curate-student", steps=3, batch_size=8, seed=2, threads=1, log_every=1)
    summary = teacher_run(str(corpus), tmp_path / "ck.pt", cfg)
    assert summary.samples == 30 and sum(summary.excluded_by_truth.values()) == 10
    teacher = load_teacher("curate-student", summary.out, device="cpu")
    meta = teacher.checkpoint_meta
    assert meta["training"]["samples"] == 30 and meta["training"]["clean_only"] is True
    assert meta["training"]["corpus_manifest"]["seed"] == 5
    assert meta["steps"] == 3 and meta["seed"] == 2 and meta["config"] == model_config("curate-student")
    assert meta["logit_scale"] == pytest.approx(teacher.logit_scale)
    assert len(meta["history"]) == 3
    # same corpus, config and seed: a byte-identical checkpoint
    again = teacher_run(str(corpus), tmp_path / "ck2.pt", cfg)
    assert Path(again.out).read_bytes() == Path(summary.out).read_bytes()


# ---------------------------------------------------------------- acceptance: the cached teacher

@pytest.mark.slow
def test_cached_teacher_separates_clean_from_swapped(tmp_path):
    """Acceptance: on a held-out corpus (other seed), CLIPScore ROC-AUC clean vs swapped >= 0.95."""
    from curate.io.shards import decode_sample, expand_shards, iter_shard
    from conftest import synth_corpus
    from curate.stages.teacher import TINY_TEACHER_CORPUS
    from curate.stages.teacher.tiny import ensure_tiny_teacher

    path = ensure_tiny_teacher()
    teacher = load_teacher("curate-tiny", str(path), device="cpu")
    assert teacher.checkpoint_meta["training"]["corpus_manifest"]["seed"] == TINY_TEACHER_CORPUS["seed"]
    held_out_seed = TINY_TEACHER_CORPUS["seed"] + 1
    corpus = tmp_path / "held-out"
    synth_corpus(corpus, samples=1500, shard_size=500, seed=held_out_seed, corrupt=0.5, target_samples=0)
    scores, truths = [], []
    for url in expand_shards(str(corpus)):
        samples = [decode_sample(raw) for raw in iter_shard(url, lambda key, reason: pytest.fail(reason))]
        images = torch.stack([teacher.preprocess(s.image) for s in samples])
        img = teacher.encode_image(images)
        txt = teacher.encode_captions([s.caption for s in samples])
        scores += (img * txt).sum(dim=1).tolist()
        truths += [s.meta["truth"] for s in samples]
    scores, truths = np.array(scores), np.array(truths)
    assert (truths == "swapped").sum() >= 100
    auc = roc_auc(scores[truths == "clean"], scores[truths == "swapped"])
    print(f"held-out clean vs swapped CLIPScore ROC-AUC = {auc:.5f}")
    assert auc >= 0.95
