"""Property tests of the payload validators (update tensors, FedMKT logits, safetensors blobs)
and the replay of the fuzz corpus. Deterministic and short; long runs: ``bench/fuzz.py``."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import targets as T
from fuzz_settings import FAST
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.errors import InvalidUpdate
from aggregator.validation import validate_update
from algorithms.base import AlgorithmError, pack_state, unpack_state
from algorithms.fedmkt.payload import LogitsPayload, PayloadError

DTYPES = st.sampled_from(
    ["float32", "float16", "uint16", "float64", "int32", "int64", "bool", "uint8"]
)


def arrays(max_dims: int = 3):
    return DTYPES.flatmap(
        lambda dt: hnp.arrays(
            np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=5)
        )
    )


NAMES = st.sampled_from(["a", "b", "c", "d", ""]) | st.integers(0, 3)


@FAST
@given(
    st.dictionaries(NAMES, arrays(), max_size=5),
    st.sampled_from([None, 1.0, 1e-3, 1e6]),
    st.booleans(),
)
def test_validate_update_on_arbitrary_arrays_raises_only_invalid_update(update, max_norm, clip):
    try:
        v = validate_update(update, T.SPEC, max_norm=max_norm, clip=clip)
    except InvalidUpdate:
        return
    assert sorted(v.tensors) == ["a", "b", "c"] and np.isfinite(v.norm)


@FAST
@given(st.data())
def test_validate_update_right_structure_any_values(data):
    """Names, dtypes and shapes right, values anything (NaN, Inf, huge, bfloat16 NaN bits)."""
    update = {}
    for name, spec in T.SPEC.tensors.items():
        dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[spec.dtype]
        update[name] = data.draw(hnp.arrays(dtype, spec.shape))
    max_norm = data.draw(st.sampled_from([None, 1.0, 1e-3]))
    clip = data.draw(st.booleans())
    try:
        v = validate_update(update, T.SPEC, max_norm=max_norm, clip=clip)
    except InvalidUpdate as exc:
        assert exc.reason in {"non_finite", "norm"}
        return
    assert np.isfinite(v.norm)


def test_validate_update_with_keys_of_mixed_types_is_typed():
    """Sorting the unexpected names of mixed types raised TypeError before the fix."""
    with pytest.raises(InvalidUpdate):
        validate_update({1: np.zeros(1), "x": np.zeros(1)}, T.SPEC)


@FAST
@given(st.binary(max_size=600))
def test_unpack_state_of_arbitrary_bytes_is_typed(raw):
    for data in (raw, struct.pack("<Q", len(raw)) + raw):
        try:
            unpack_state(data)
        except AlgorithmError:
            pass


@FAST
@given(st.dictionaries(st.text(max_size=8), arrays(), max_size=3))
def test_unpack_state_round_trip(state):
    state = {k: v for k, v in state.items() if k}
    out = unpack_state(pack_state(state))
    assert sorted(out) == sorted(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape


LOGITS_NAMES = st.sampled_from(sorted(T._LOGITS_FIELDS))


@FAST
@given(st.dictionaries(LOGITS_NAMES, arrays(max_dims=2), max_size=7))
def test_logits_from_arbitrary_arrays_is_typed(arrs):
    T._logits(arrs)


@FAST
@given(st.sampled_from(sorted(T._LOGITS_FIELDS)), arrays(max_dims=2))
def test_logits_with_one_array_replaced_is_typed(name, arr):
    arrs = dict(T._sample_payload().to_arrays())
    arrs[name] = arr
    T._logits(arrs)


@FAST
@given(st.data())
def test_logits_with_right_dtypes_any_values_is_typed(data):
    """Every dtype and rank right (so the value checks run), values and lengths anything."""
    n, k, s = (
        data.draw(st.integers(0, 4)),
        data.draw(st.integers(0, 3)),
        data.draw(st.integers(0, 3)),
    )
    arrs = {
        "topk_values": data.draw(hnp.arrays(np.float16, (n, k))),
        "topk_ids": data.draw(hnp.arrays(np.int32, (n, k))),
        "offsets": data.draw(hnp.arrays(np.int64, s + 1)),
        "sample_ce": data.draw(hnp.arrays(np.float32, s)),
        "vocab_size": data.draw(hnp.arrays(np.int64, 1)),
        "k": np.array([k], dtype=np.int64),
        "version": data.draw(hnp.arrays(np.int64, 1)),
    }
    T._logits(arrs)


@FAST
@given(st.binary(max_size=600))
def test_logits_from_arbitrary_bytes_is_typed(raw):
    try:
        LogitsPayload.from_bytes(raw)
    except PayloadError:
        pass


@FAST
@given(st.binary(max_size=600))
def test_tensors_target(data):
    T.fuzz_tensors(data)


@FAST
@given(st.binary(max_size=600))
def test_arrays_target(data):
    T.fuzz_arrays(data)


# -- the corpus: seeds and what the long runs found ------------------------------------------


def _corpus():
    for name in T.TARGETS:
        for path in T.corpus_files(name):
            yield pytest.param(name, path, id=f"{name}/{path.name[:12]}")


def test_corpus_is_present():
    assert all(T.corpus_files(name) for name in T.TARGETS)


def test_corpus_replays_clean():
    """Every corpus input through its target (one test: the corpus has thousands of files)."""
    for name, fn in T.TARGETS.items():
        for path in T.corpus_files(name):
            try:
                fn(path.read_bytes())
            except Exception as exc:  # noqa: BLE001 (name the input in the failure)
                raise AssertionError(f"corpus input {name}/{path.name} fails: {exc!r}") from exc


def test_seeds_reach_the_deep_paths():
    """The seeds are valid inputs: frames open, messages decode, payloads validate."""
    seeds = T.seeds()
    for f in seeds["envelope"][:6]:
        T.receiver().open(f[1:])
    for m in seeds["codec"]:
        T.decode(m)
    LogitsPayload.from_bytes(seeds["tensors"][1][1:])


# -- the LLM server's request validation -----------------------------------------------------

json_bodies = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, 10**30, -1, 0])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
HTTP_FIELDS = [
    "model",
    "prompt",
    "max_tokens",
    "n",
    "temperature",
    "top_p",
    "logprobs",
    "prompt_logprobs",
    "echo",
    "stop",
    "seed",
    "stream",
    "best_of",
    "suffix",
]


@FAST
@given(st.dictionaries(st.sampled_from(HTTP_FIELDS), json_bodies, max_size=6))
def test_http_request_validation_raises_only_api_errors(body):
    import json

    T.fuzz_http(json.dumps(body).encode())


@FAST
@given(st.binary(max_size=400))
def test_http_target(data):
    T.fuzz_http(data)
