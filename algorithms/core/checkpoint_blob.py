"""A whole model checkpoint on the wire: ONE self-contained safetensors blob, never pickle.

The blob is the model's weights as a safetensors file whose only metadata key, ``"cotune"``,
holds a JSON document (sorted keys, compact)::

    {"format": <format>, "version": <int>, "files": {"config.json": {"text": ...}, ...}, ...}

``files`` are the checkpoint's non-weight files (config, generation config, tokenizer); a file
that is not UTF-8 text travels as ``{"base64": ...}``. Callers add their own keys (the FedBiOT
emulator adds its layer plan). One metadata key, because safetensors writes its metadata map
in a per-process random order: with one key, the same model always gives the same bytes, so
the content hash is stable and an unchanged checkpoint is not sent again.

A device unpacks it with :func:`unpack_checkpoint` into a normal checkpoint directory (the blob
itself becomes ``model.safetensors``) and loads it like any model, quantized as its profile
says. Names of files are checked (no paths, no pickles, no code) before anything is written.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from algorithms.base import AlgorithmError

META_KEY = "cotune"
WEIGHTS_NAME = "model.safetensors"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".safetensors", ".py")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class CheckpointBlobError(AlgorithmError):
    """A checkpoint blob that is malformed, of another format, from a newer cotune, or that
    carries files that are not allowed."""


def _save_plain(model: torch.nn.Module, directory: str, tokenizer: Any) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def pack_checkpoint(model: torch.nn.Module, tokenizer: Any, *, fmt: str, version: int = 1,
                    extra: Mapping[str, Any] | None = None,
                    save: Callable[[torch.nn.Module, str, Any], None] | None = None) -> bytes:
    """``model`` (a plain, unwrapped model) and its tokenizer as one deterministic blob.
    ``save(model, directory, tokenizer)`` writes the checkpoint (default: ``save_pretrained``)."""
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    with tempfile.TemporaryDirectory(prefix="cotune-checkpoint-") as tmp:
        (save or _save_plain)(model, tmp, tokenizer)
        tensors: dict[str, torch.Tensor] = {}
        files: dict[str, dict[str, str]] = {}
        for p in sorted(Path(tmp).iterdir()):
            if p.suffix == ".safetensors":
                tensors.update(load_file(str(p)))
            elif p.name.endswith(".safetensors.index.json"):
                continue  # shards are merged into one file
            elif p.is_file():
                raw = p.read_bytes()
                try:
                    files[p.name] = {"text": raw.decode("utf-8")}
                except UnicodeDecodeError:
                    files[p.name] = {"base64": base64.b64encode(raw).decode("ascii")}
    if not tensors:
        raise CheckpointBlobError("the checkpoint has no safetensors weights")
    meta = {**dict(extra or {}), "format": fmt, "version": version, "files": files}
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return st_save(tensors, metadata={META_KEY: text})


def read_checkpoint_meta(blob: bytes | bytearray, *, fmt: str, max_version: int,
                         error: type[CheckpointBlobError] = CheckpointBlobError) -> dict:
    """The blob's metadata document, checked: format, version, file names and bodies."""
    what = fmt.rsplit(".", 1)[-1]
    if len(blob) < 8:
        raise error(f"{what} blob is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise error(f"{what} blob has an invalid safetensors header length")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]))
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise error(f"not a cotune {what} blob: {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise error(f"not a cotune {what} blob (format must be {fmt!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version > max_version:
        raise error(f"{what} blob version {version!r} is newer than this cotune understands "
                    f"({max_version}); upgrade cotune on the device")
    files = meta.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        raise error(f"{what} blob lacks config.json")
    for name, body in files.items():
        if not isinstance(name, str) or not _SAFE_NAME.match(name) or name.lower().endswith(_REFUSED_SUFFIXES):
            raise error(f"{what} blob carries a file that is not allowed: {name!r}")
        if (not isinstance(body, dict) or len(body) != 1 or not isinstance(next(iter(body.values())), str)
                or next(iter(body)) not in ("text", "base64")):
            raise error(f"{what} blob file {name!r} is malformed")
    return meta


def unpack_checkpoint(blob: bytes | bytearray, directory: str | os.PathLike, meta: Mapping[str, Any],
                      extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write a blob whose ``meta`` was read (checked) by :func:`read_checkpoint_meta` as a
    checkpoint directory, atomically: a complete directory or none. An existing ``directory``
    is taken as already unpacked (callers name it by content hash)."""
    out = Path(directory)
    if (out / WEIGHTS_NAME).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        for name, body in meta["files"].items():
            data = body["text"].encode("utf-8") if "text" in body else base64.b64decode(body["base64"])
            (tmp / name).write_bytes(data)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / WEIGHTS_NAME).write_bytes(bytes(blob))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / WEIGHTS_NAME).is_file():  # another process unpacked the same content first
            return out
        raise
    return out


def use_checkpoint_blob(blob: bytes, ctx: Any, subdir: str, meta: Mapping[str, Any], keep: int = 2,
                        extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Unpack a checked blob under the device's workspace ``subdir`` (named by its SHA-256, so an
    unchanged checkpoint is neither written nor loaded again), keep the ``keep`` newest, and make
    it the context's base model."""
    import hashlib

    digest = hashlib.sha256(blob).hexdigest()
    root = Path(ctx.workspace()) / subdir
    target = root / digest
    if not target.is_dir():
        unpack_checkpoint(blob, target, meta, extra_files)
        old = sorted((p for p in root.iterdir() if p.is_dir() and p != target), key=lambda p: p.stat().st_mtime)
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    ctx.use_base(str(target))
    return target
