"""Teachers: one factory, `load_teacher(model, pretrained, device, precision)`, in the style of open_clip's
`create_model_and_transforms`. Every model goes through open_clip's factory; our own small architectures
(`curate-tiny`, `curate-student`) are open_clip config JSON files in `curate/models/configs/`.

`pretrained` is one of
  * an open_clip tag (`openai`, `laion2b_s34b_b79k`, ...): weights come from the Hugging Face cache, or are
    downloaded when the hub is reachable; offline and not cached -> a one-line CurateError, at once;
  * a path to a local checkpoint: loaded with `torch.load(weights_only=True)` (never unpickles code) or
    safetensors; our own checkpoints (from `curate teacher train`) carry their config and training metadata;
  * `none`: random init, for shape tests and benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from curate.errors import CurateError
from curate.io.tables import TeacherInfo

CONFIG_DIR = Path(__file__).parent / "configs"
CHECKPOINT_FORMAT = "curate-checkpoint/1"
PRECISIONS = ("fp32", "fp16", "bf16")
RANDOM_INIT_SEED = 0  # `--pretrained none`: the same random weights every time
HUB_HOST = ("huggingface.co", 443)
HUB_PROBE_SECONDS = 3.0
LOCAL_CHECKPOINT_HINT = "--pretrained /path/to/open_clip_model.safetensors|.pt"

_registered = False


def register_configs() -> None:
    """Make our config JSONs (curate-tiny, curate-student) known to open_clip's factory (idempotent)."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def curate_model_names() -> list[str]:
    """The architectures this package ships as open_clip configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(model: str) -> dict:
    """The open_clip config dict of an architecture name (ours or open_clip's), or CurateError."""
    register_configs()
    import open_clip

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise CurateError(f"unknown model {model!r}: ours are {', '.join(curate_model_names())}; "
                          f"open_clip knows e.g. ViT-B-32, ViT-L-14 (see open_clip.list_models())")
    return cfg


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; `cuda` without a GPU is a user error."""
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CurateError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise CurateError(f"--device {device!r}: expected auto, cpu or cuda[:N]")


@dataclass
class Teacher:
    """A loaded CLIP model in eval mode, with its tokenizer and eval preprocess."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    device: torch.device
    precision: str
    info: TeacherInfo
    config: dict
    checkpoint_meta: dict = field(default_factory=dict)  # our checkpoints' metadata (training data, ...)

    @property
    def logit_scale(self) -> float:
        return self.info.logit_scale

    @property
    def embed_dim(self) -> int:
        return self.info.embed_dim

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    def _autocast(self):
        # Mixed precision only where it pays: on CUDA. On CPU we always compute in fp32.
        if self.device.type == "cuda" and self.precision in ("fp16", "bf16"):
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            return torch.autocast(device_type="cuda", dtype=dtype)
        return contextlib.nullcontext()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [N,3,H,W] -> L2-normalised float32 embeddings [N,D] (on the teacher's device)."""
        with torch.inference_mode(), self._autocast():
            emb = self.model.encode_image(images.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [N,L] -> L2-normalised float32 embeddings [N,D] (on the teacher's device)."""
        with torch.inference_mode(), self._autocast():
            emb = self.model.encode_text(tokens.to(self.device, non_blocking=True))
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Convenience: tokenise and encode a list of strings."""
        return self.encode_text(self.tokenizer(list(captions)))


# ---------------------------------------------------------------- the factory

def load_teacher(model: str, pretrained: str = "none", device: str = "auto", precision: str = "fp32") -> Teacher:
    """Build a teacher: open_clip architecture `model` with weights from `pretrained` (tag, file path or none)."""
    if precision not in PRECISIONS:
        raise CurateError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    register_configs()
    import open_clip

    dev = resolve_device(device)
    pretrained = str(pretrained)
    meta: dict = {}
    if pretrained.lower() == "none":
        config = model_config(model)
        # random init is seeded (without touching the caller's RNG) so reruns give identical bytes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            clip = _create(model, None, config)
        weights = "none"
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser().resolve()
        clip, config, meta = _from_local_file(model, path)
        weights = str(path)
    elif _looks_like_path(pretrained):
        raise CurateError(f"{pretrained}: checkpoint file does not exist; give an existing file, "
                          f"an open_clip tag (e.g. openai) or `none`")
    else:
        config = model_config(model)
        clip = _from_tag(model, pretrained)
        weights = pretrained

    clip = clip.to(dev).eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model, context_length=int(clip.context_length))
    preprocess = eval_transform(clip)
    embed_dim = int(clip.text_projection.shape[1]) if getattr(clip, "text_projection", None) is not None \
        else int(config["embed_dim"])
    info = TeacherInfo(model=model, pretrained=weights, embed_dim=embed_dim,
                       logit_scale=float(clip.logit_scale.detach().float().exp().item()))
    # fp16/bf16 mean autocast on CUDA; on CPU the teacher computes in fp32 (and says so).
    effective = precision if dev.type == "cuda" else "fp32"
    return Teacher(model=clip, tokenizer=tokenizer, preprocess=preprocess, device=dev,
                   precision=effective, info=info, config=config, checkpoint_meta=meta)


def eval_transform(clip: torch.nn.Module):
    """open_clip's eval preprocess (resize to the tower's image size, centre crop, normalise)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**clip.visual.preprocess_cfg), is_train=False)


def create_model(model: str, config: dict | None = None) -> torch.nn.Module:
    """A randomly initialised open_clip model of architecture `model` (optionally with an explicit config)."""
    register_configs()
    return _create(model, None, config)


def _create(model: str, pretrained: str | None, config: dict | None = None, **kwargs) -> torch.nn.Module:
    import open_clip

    overrides = {}
    if config is not None:
        # A stored config (from a checkpoint) wins over the registered one of the same name.
        overrides = {k: v for k, v in config.items() if k not in ("custom_text",)}
    try:
        with _quiet_open_clip():
            return open_clip.create_model(model, pretrained=pretrained, precision="fp32", device="cpu",
                                          weights_only=True, **kwargs, **overrides)
    except RuntimeError as exc:
        if "not found in built-ins" in str(exc):
            raise CurateError(f"unknown model {model!r}: ours are {', '.join(curate_model_names())}; "
                              "open_clip knows e.g. ViT-B-32, ViT-L-14") from None
        raise


@contextlib.contextmanager
def _quiet_open_clip():
    # open_clip logs a warning for every random init (the point of `none`, not news) and an error for a failed
    # download (which we turn into one CurateError line); exceptions still propagate.
    import logging

    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(old)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.startswith((".", "~")) or value.endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


# ---------------------------------------------------------------- open_clip tags (downloads)

def _from_tag(model: str, tag: str) -> torch.nn.Module:
    import open_clip

    if not open_clip.get_pretrained_cfg(model, tag):
        known = open_clip.list_pretrained_tags_by_model(model)
        hint = f"known tags for {model}: {', '.join(known)}" if known else f"{model} has no open_clip pretrained tags"
        raise CurateError(f"--pretrained {tag}: not a file and not an open_clip tag ({hint}); "
                          f"or pass a local checkpoint: {LOCAL_CHECKPOINT_HINT}, or `none` for random init")
    online = not _env_offline() and hub_reachable()
    try:
        # Offline: only the local cache is consulted, so a miss fails at once instead of retrying for a minute.
        with _hub_offline(not online):
            return _create(model, tag)
    except CurateError:
        raise
    except Exception as exc:  # huggingface_hub / urllib raise many types
        if not online:
            raise CurateError(f"weights for {model}/{tag} cannot be downloaded (no network) and are not cached; "
                              f"pass a local checkpoint instead: {LOCAL_CHECKPOINT_HINT}") from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CurateError(f"weights for {model}/{tag} could not be loaded ({first_line}); "
                          f"pass a local checkpoint instead: {LOCAL_CHECKPOINT_HINT}") from None


def _env_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CURATE_OFFLINE"))


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Can we open a TCP connection to the Hugging Face hub within `timeout` seconds (DNS included)?"""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection(HUB_HOST, timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts, so the probe runs in a daemon thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Switch huggingface_hub to cache-only mode for the duration (it reads this flag at call time)."""
    if not offline:
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


# ---------------------------------------------------------------- local checkpoints

def read_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) of a checkpoint; a file that needs unpickling code is refused."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's unpickler raises many types for bad bytes
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        if isinstance(exc, pickle.UnpicklingError) and "weights only load failed" in str(exc).lower():
            raise CurateError(f"{path}: refused to load, the checkpoint holds pickled Python objects that "
                              "torch.load(weights_only=True) does not allow; re-save it as a plain state_dict "
                              "or as safetensors") from None
        raise CurateError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {first})") from None


def _from_local_file(model: str, path: Path) -> tuple[torch.nn.Module, dict, dict]:
    """(model, config, our metadata) from a local checkpoint file."""
    if path.suffix != ".safetensors":
        checkpoint = read_checkpoint(path)
        meta = checkpoint.get("curate") if isinstance(checkpoint, dict) else None
        if isinstance(meta, dict) and meta.get("format") == CHECKPOINT_FORMAT:
            if meta["model"] != model:
                raise CurateError(f"{path}: checkpoint is a {meta['model']} model, not {model}; "
                                  f"use --model {meta['model']}")
            config = meta["config"]
            clip = _create(model, None, config)
            _load_state(clip, checkpoint["state_dict"], path)
            return clip, config, meta
    # A safetensors file or a plain open_clip / OpenAI state dict: open_clip's loader converts and checks it.
    config = model_config(model)
    try:
        return _create(model, str(path)), config, {}
    except CurateError:
        raise
    except Exception as exc:
        raise CurateError(f"{path}: cannot load into {model} ({str(exc).splitlines()[0][:200]})") from None


def _load_state(clip: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CurateError(f"{path}: weights do not fit the stored config ({str(exc).splitlines()[0][:200]})") from None


def save_checkpoint(clip: torch.nn.Module, path: str | Path, model: str, config: dict, extra: dict | None = None) -> Path:
    """Atomically save a checkpoint that `load_teacher(model, path)` restores: state dict + our metadata.

    Only tensors, strings, numbers, lists and dicts are stored, so it loads with weights_only=True.
    """
    from curate import __version__
    from curate.io.atomic import atomic_path

    state = {k: v.detach().to("cpu").clone() for k, v in clip.state_dict().items()}
    meta = {"format": CHECKPOINT_FORMAT, "model": model, "config": config,
            "logit_scale": float(clip.logit_scale.detach().float().exp().item()),
            "code_version": __version__, **(extra or {})}
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        # Saved through a handle: torch then names the zip root `archive`, not after the (random) temp name,
        # so equal content gives equal bytes.
        torch.save({"state_dict": state, "curate": meta}, handle)
    return path

