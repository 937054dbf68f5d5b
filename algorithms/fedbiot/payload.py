"""The emulator on the wire: one self-contained checkpoint blob
(:mod:`algorithms.core.checkpoint_blob`), never pickle. Its metadata document::

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

import json
import os
from pathlib import Path
from typing import Any

import torch

from algorithms.core.checkpoint_blob import (
    CheckpointBlobError,
    pack_checkpoint,
    read_checkpoint_meta,
    unpack_checkpoint,
)
from algorithms.core.emulator import EMULATOR_PLAN_NAME, EmulatorError, EmulatorPlan, save_emulator

FORMAT = "cotune.emulator"
VERSION = 1


class EmulatorBlobError(CheckpointBlobError):
    """An emulator blob that is malformed, from a newer cotune, or carries unsafe files."""


def pack_emulator(model: torch.nn.Module, plan: EmulatorPlan, tokenizer: Any) -> bytes:
    """The emulator (a plain, unwrapped model) and its tokenizer as one deterministic blob."""
    return pack_checkpoint(model, tokenizer, fmt=FORMAT, version=VERSION, extra={"plan": plan.to_dict()},
                           save=lambda m, d, t: save_emulator(m, plan, d, t))


def read_emulator_meta(blob: bytes | bytearray) -> dict:
    """The blob's metadata document (checked: format, version, plan, file names)."""
    meta = read_checkpoint_meta(blob, fmt=FORMAT, max_version=VERSION, error=EmulatorBlobError)
    try:
        meta["plan"] = EmulatorPlan.from_dict(meta.get("plan"))
    except EmulatorError as exc:
        raise EmulatorBlobError(f"emulator blob: {exc}") from exc
    return meta


def emulator_plan(blob: bytes | bytearray) -> EmulatorPlan:
    return read_emulator_meta(blob)["plan"]


def plan_file(meta: dict) -> dict[str, bytes]:
    """The plan as the file an unpacked emulator directory carries beside its weights."""
    return {EMULATOR_PLAN_NAME: (json.dumps(meta["plan"].to_dict(), indent=2) + "\n").encode("utf-8")}


def unpack_emulator(blob: bytes | bytearray, directory: str | os.PathLike) -> Path:
    """Write the blob as a checkpoint directory (atomically: a complete directory or none).

    An existing ``directory`` is taken as already unpacked (callers name it by content hash).
    """
    meta = read_emulator_meta(blob)
    return unpack_checkpoint(blob, directory, meta, plan_file(meta))
