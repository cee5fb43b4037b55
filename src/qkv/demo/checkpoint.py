"""Demo checkpoints: written atomically, read back with checks and clear errors.

A checkpoint is `torch.save` of one dict (`torch.load(weights_only=True)` reads it back, so
loading never runs pickled code):

    {"format": "qkv.demo.dates", "version": 1,
     "model_config": {...TransformerConfig fields...},
     "src_vocab": [characters], "tgt_vocab": [characters],
     "state_dict": {name: tensor}, "meta": {...anything JSON-like...}}

Atomic write: the bytes go to a temporary file in the same directory, are flushed to disk,
and only then `os.replace` puts the file in place (a rename, atomic on POSIX and Windows).
A crash or an exception half-way leaves the previous checkpoint untouched and no temporary
file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any

import torch

from ..nn import Transformer, TransformerConfig
from .dates import Vocab

__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "CheckpointError",
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT = "qkv.demo.dates"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, foreign, or does not fit its model."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the model (in eval mode), its vocabularies, and metadata."""

    model: Transformer
    src_vocab: Vocab
    tgt_vocab: Vocab
    meta: dict


def _file_mode(path: Path) -> int:
    """The mode of the file being replaced, or 0666 minus the umask for a new one."""
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(file)` on a temporary file beside `path`, then move it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; keep what a plain open() gives
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def save_checkpoint(
    path: str | os.PathLike,
    model: Transformer,
    src_vocab: Vocab,
    tgt_vocab: Vocab,
    *,
    meta: dict | None = None,
) -> Path:
    """Write `model` and its vocabularies to `path` atomically; returns the path."""
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be a qkv.nn.Transformer; got {type(model).__name__}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model_config": asdict(model.config),
        "src_vocab": src_vocab.to_list(),
        "tgt_vocab": tgt_vocab.to_list(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    return atomic_write(path, lambda f: torch.save(payload, f))


def _read(path: Path) -> Any:
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} (train one with `qkv demo --out DIR`)")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (an interrupted copy?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors of every kind: report one clear line
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): "
            f"{reason[:160] or type(e).__name__}"
        ) from e


def _check_state(model: Transformer, state: Any, path: Path) -> dict:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not fit the model its config describes (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: weight {name} has shape {tuple(state[name].shape)}, the config "
                f"needs {tuple(tensor.shape)}"
            )
    return state


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError with one clear line
    for a missing, truncated, corrupt, foreign or inconsistent file."""
    path = Path(path)
    data = _read(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not a qkv demo checkpoint (format {found!r})")
    version = data.get("version")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise CheckpointError(
            f"{path} has checkpoint version {version!r}; this qkv reads version {VERSION}"
        )
    try:
        config_fields = {f.name for f in fields(TransformerConfig)}
        raw = data["model_config"]
        config = TransformerConfig(**{k: v for k, v in raw.items() if k in config_fields})
        src_vocab, tgt_vocab = Vocab(data["src_vocab"]), Vocab(data["tgt_vocab"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: damaged config or vocabulary: {e}") from e
    if (len(src_vocab), len(tgt_vocab)) != (config.src_vocab_size, config.tgt_vocab_size):
        raise CheckpointError(
            f"{path}: vocabularies of {len(src_vocab)} and {len(tgt_vocab)} tokens do not "
            f"match the config's {config.src_vocab_size} and {config.tgt_vocab_size}"
        )
    model = Transformer(config)
    model.load_state_dict(_check_state(model, data.get("state_dict"), path))
    model.eval()
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return Checkpoint(model, src_vocab, tgt_vocab, meta)
