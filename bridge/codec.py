"""Message codec: a JSON header plus tensors as safetensors. No pickle, no eval.

Layout of an encoded message (the plaintext that the envelope then encrypts):

    b"CTM" | u8 codec version | u32 LE header length | header JSON (UTF-8) | safetensors bytes

The header is ``{"type": str, "v": int, "fields": {...}, "tensors": {field: [names]}}``.
Tensor-valued fields (``Tensors`` = ``dict[str, numpy.ndarray]``) are stored in the safetensors
section under ``"<field>/<name>"``; everything else is plain JSON. Forward compatibility:
fields a newer sender added are ignored with a warning; a message version newer than this
build supports is refused with :class:`UnsupportedVersion`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import struct
import types
import typing
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import MalformedMessage, UnsupportedVersion

log = logging.getLogger(__name__)

MAGIC = b"CTM"
CODEC_VERSION = 1
_PREFIX = struct.Struct("<3sBI")



class Tensors(dict):
    """Annotation marker for a ``dict[str, numpy.ndarray]`` field: it travels in the
    safetensors section. Plain ``dict`` fields travel as JSON."""

_REGISTRY: dict[str, type[Message]] = {}


@dataclasses.dataclass
class Message:
    """Base of every typed wire message. Subclasses are dataclasses with ``TYPE`` and
    ``VERSION`` class attributes and register themselves with :func:`register`."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1


def register(cls: type[Message]) -> type[Message]:
    if not cls.TYPE or cls.TYPE in _REGISTRY:
        raise ValueError(f"message type {cls.TYPE!r} is empty or registered twice")
    _REGISTRY[cls.TYPE] = cls
    return cls


def message_types() -> dict[str, type[Message]]:
    return dict(_REGISTRY)


@functools.cache  # resolving type hints costs ~0.3 ms; once per class
def _field_kinds(cls: type[Message]) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, globalns={"Tensors": Tensors, **vars(typing)})
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_tensors(hint: Any) -> bool:
    return hint is Tensors


def encode(msg: Message) -> bytes:
    cls = type(msg)
    if _REGISTRY.get(cls.TYPE) is not cls:
        raise MalformedMessage(f"{cls.__name__} is not a registered message type")
    fields: dict[str, Any] = {}
    tensors: dict[str, np.ndarray] = {}
    tensor_index: dict[str, list[str]] = {}
    for name, hint in _field_kinds(cls).items():
        value = getattr(msg, name)
        if _is_tensors(hint):
            value = value or {}
            tensor_index[name] = sorted(value)
            for key, arr in value.items():
                if not isinstance(arr, np.ndarray):
                    raise MalformedMessage(f"{cls.TYPE}.{name}[{key!r}] must be a numpy array, got {type(arr).__name__}")
                # reshape: ascontiguousarray turns a 0-d array into shape (1,)
                tensors[f"{name}/{key}"] = np.ascontiguousarray(arr).reshape(arr.shape)
        else:
            fields[name] = value
    header = {"type": cls.TYPE, "v": cls.VERSION, "fields": fields, "tensors": tensor_index}
    try:
        head = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise MalformedMessage(f"{cls.TYPE}: field not JSON-serialisable ({exc})") from exc
    body = st_save(tensors) if tensors else b""
    return _PREFIX.pack(MAGIC, CODEC_VERSION, len(head)) + head + body


def decode(data: bytes | memoryview) -> Message:
    data = bytes(data)
    if len(data) < _PREFIX.size:
        raise MalformedMessage("message shorter than its prefix")
    magic, codec_version, head_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise MalformedMessage("not a cotune message (bad magic)")
    if codec_version != CODEC_VERSION:
        raise UnsupportedVersion(f"codec version {codec_version} not supported (this build reads {CODEC_VERSION})")
    end = _PREFIX.size + head_len
    if end > len(data):
        raise MalformedMessage("header length points past the end of the message")
    try:
        header = _loads(data[_PREFIX.size:end])
        if not isinstance(header, dict):
            raise TypeError("header is not an object")
        mtype, version, fields, index = header["type"], header["v"], header["fields"], header["tensors"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise MalformedMessage(f"bad message header ({exc})") from exc
    cls = _REGISTRY.get(mtype) if isinstance(mtype, str) else None
    if cls is None:
        raise MalformedMessage(f"unknown message type {mtype!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MalformedMessage(f"bad version {version!r}")
    if version > cls.VERSION:
        raise UnsupportedVersion(f"{mtype} v{version} is newer than supported v{cls.VERSION}; upgrade cotune")
    if not isinstance(fields, dict) or not isinstance(index, dict):
        raise MalformedMessage("header fields/tensors must be objects")
    tensors: dict[str, np.ndarray] = {}
    if end < len(data):
        try:
            tensors = st_load(data[end:])
        except Exception as exc:  # safetensors raises its own error types
            raise MalformedMessage(f"bad tensor section ({exc})") from exc
    kinds = _field_kinds(cls)
    kwargs: dict[str, Any] = {}
    unknown = [name for name in (*fields, *index) if name not in kinds]
    if unknown:  # one line per message, however many fields it brings
        names = ", ".join(repr(n[:64]) for n in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        log.warning("ignoring %d unknown field(s) %s of %s v%d (sent by a newer version?)",
                    len(unknown), names, mtype, version)
    for name, value in fields.items():
        if name not in kinds:
            continue
        kwargs[name] = _check_type(mtype, name, value, kinds[name])
    for name, keys in index.items():
        if name not in kinds:
            continue
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise MalformedMessage(f"{mtype}.{name}: tensor index must be a list of names")
        if not _is_tensors(kinds[name]):
            raise MalformedMessage(f"{mtype}.{name} is not a tensor field")
        try:
            kwargs[name] = {k: tensors[f"{name}/{k}"] for k in keys}
        except KeyError as exc:
            raise MalformedMessage(f"{mtype}.{name}: tensor {exc} listed but missing") from None
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MalformedMessage(f"{mtype}: {exc}") from exc
    except (ValueError, OverflowError) as exc:  # __post_init__ validation of the dataclass
        raise MalformedMessage(f"{mtype}: {exc}") from exc


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed (the encoder never writes it)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise ValueError(f"number {text[:32]} is out of the float range")
    return value


def _loads(raw: bytes) -> Any:
    """``json.loads`` that refuses what :func:`encode` never writes: NaN, Infinity, and numbers
    that overflow a float."""
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)


_JSON_TYPES = {str: str, int: int, float: (int, float), bool: bool, list: list, dict: dict}


def _check_type(mtype: str, name: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint) or hint
    if origin is typing.Union or origin is types.UnionType:  # Optional[X], X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        origin = typing.get_origin(args[0]) or args[0]
    if _is_tensors(origin):
        raise MalformedMessage(f"{mtype}.{name}: tensors travel in the tensor section, not as JSON")
    expected = _JSON_TYPES.get(origin)
    if expected is None:
        return value
    if isinstance(value, bool) and origin in (int, float):
        raise MalformedMessage(f"{mtype}.{name}: expected {origin.__name__}, got bool")
    if not isinstance(value, expected):
        raise MalformedMessage(f"{mtype}.{name}: expected {origin.__name__}, got {type(value).__name__}")
    if origin is float:
        if isinstance(value, int) and not -1e308 < value < 1e308:  # float() would overflow
            raise MalformedMessage(f"{mtype}.{name}: number out of the float range")
        return float(value)
    return value
