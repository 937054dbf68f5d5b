"""The emulator on the wire: ONE self-contained safetensors blob, never pickle.

The blob is the emulator's weights as a safetensors file whose only metadata key,
``"cotune"``, holds a JSON document (sorted keys, compact)::

    {"format": "cotune.emulator", "version": 1, "plan": {<EmulatorPlan.to_dict()>},
     "files": {"config.json": {"text": ...}, "tokenizer.json": {"text": ...}, ...}}

``files`` are the non-weight files of :func:`~algorithms.core.emulator.save_emulator`
(config, generation config, plan, tokenizer); a file that is not UTF-8 text travels as
``{"base64": ...}``. One metadata key, because safetensors writes its metadata map in a
per-process random order: with one key, the same emulator always gives the same bytes, so the
content hash is stable and an unchanged emulator is not sent again.

A device unpacks it with :func:`unpack_emulator` into a normal checkpoint directory (the blob
itself becomes ``model.safetensors``) and loads it like any model, quantized as its profile
says.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

from algorithms.base import AlgorithmError
from algorithms.core.emulator import EMULATOR_PLAN_NAME, EmulatorError, EmulatorPlan, save_emulator

FORMAT = "cotune.emulator"
VERSION = 1
META_KEY = "cotune"
WEIGHTS_NAME = "model.safetensors"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".safetensors", ".py")
_MAX_HEADER = 100 * 2**20  # safetensors' own limit


class EmulatorBlobError(AlgorithmError):
    """An emulator blob that is malformed, from a newer cotune, or carries unsafe files."""


def pack_emulator(model: torch.nn.Module, plan: EmulatorPlan, tokenizer: Any) -> bytes:
    """The emulator (a plain, unwrapped model) and its tokenizer as one deterministic blob."""
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    with tempfile.TemporaryDirectory(prefix="cotune-emulator-") as tmp:
        save_emulator(model, plan, tmp, tokenizer)
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
        raise EmulatorBlobError("save_emulator wrote no safetensors weights")
    meta = {"format": FORMAT, "version": VERSION, "plan": plan.to_dict(), "files": files}
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return st_save(tensors, metadata={META_KEY: text})


def read_emulator_meta(blob: bytes | bytearray) -> dict:
    """The blob's metadata document (checked: format, version, plan, file names)."""
    if len(blob) < 8:
        raise EmulatorBlobError("emulator blob is too short to be a safetensors file")
    (n,) = struct.unpack("<Q", bytes(blob[:8]))
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise EmulatorBlobError("emulator blob has an invalid safetensors header length")
    try:
        header = json.loads(bytes(blob[8 : 8 + n]))
        meta = json.loads(header["__metadata__"][META_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise EmulatorBlobError(
            f"not a cotune emulator blob: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EmulatorBlobError(f"not a cotune emulator blob (format must be {FORMAT!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise EmulatorBlobError(
            f"emulator blob version {version!r} is newer than this cotune understands "
            f"({VERSION}); upgrade cotune on the device"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or "config.json" not in files:
        raise EmulatorBlobError("emulator blob lacks config.json")
    for name, body in files.items():
        if (
            not isinstance(name, str)
            or not _SAFE_NAME.match(name)
            or name.lower().endswith(_REFUSED_SUFFIXES)
        ):
            raise EmulatorBlobError(f"emulator blob carries a file that is not allowed: {name!r}")
        if (
            not isinstance(body, dict)
            or len(body) != 1
            or not isinstance(next(iter(body.values())), str)
            or next(iter(body)) not in ("text", "base64")
        ):
            raise EmulatorBlobError(f"emulator blob file {name!r} is malformed")
    try:
        meta["plan"] = EmulatorPlan.from_dict(meta.get("plan"))
    except EmulatorError as exc:
        raise EmulatorBlobError(f"emulator blob: {exc}") from exc
    return meta


def emulator_plan(blob: bytes | bytearray) -> EmulatorPlan:
    return read_emulator_meta(blob)["plan"]


def unpack_emulator(blob: bytes | bytearray, directory: str | os.PathLike) -> Path:
    """Write the blob as a checkpoint directory (atomically: a complete directory or none).

    An existing ``directory`` is taken as already unpacked (callers name it by content hash).
    """
    out = Path(directory)
    if (out / WEIGHTS_NAME).is_file():
        return out
    meta = read_emulator_meta(blob)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        for name, body in meta["files"].items():
            data = (
                body["text"].encode("utf-8") if "text" in body else base64.b64decode(body["base64"])
            )
            (tmp / name).write_bytes(data)
        (tmp / EMULATOR_PLAN_NAME).write_text(
            json.dumps(meta["plan"].to_dict(), indent=2) + "\n", encoding="utf-8"
        )
        (tmp / WEIGHTS_NAME).write_bytes(bytes(blob))
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / WEIGHTS_NAME).is_file():  # another process unpacked the same content first
            return out
        raise
    return out
