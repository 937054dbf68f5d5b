"""FedMKT logits payload: round trips, a golden version-1 message, every invalid case, and the
builder from a model's logits (CE checked against a hand-written computation)."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from algorithms.base import AlgorithmError, pack_state
from algorithms.fedmkt.payload import (
    PAYLOAD_VERSION,
    LogitsPayload,
    PayloadError,
    payload_from_logits,
)

# LogitsPayload(values [[-0.5, -1.5], [-0.25, -3], [-1, -1]], ids [[7, 1], [0, 9], [4, 5]],
# offsets [0, 2, 3], sample_ce [1.5, 0.25], vocab_size 10).to_bytes() as version 1 wrote it
GOLDEN_V1 = (
    "uAEAAAAAAAB7ImsiOnsiZHR5cGUiOiJJNjQiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOlswLDhdfSwib2Zmc2V0"
    "cyI6eyJkdHlwZSI6Ikk2NCIsInNoYXBlIjpbM10sImRhdGFfb2Zmc2V0cyI6WzgsMzJdfSwidmVyc2lvbiI6eyJkdHlw"
    "ZSI6Ikk2NCIsInNoYXBlIjpbMV0sImRhdGFfb2Zmc2V0cyI6WzMyLDQwXX0sInZvY2FiX3NpemUiOnsiZHR5cGUiOiJJ"
    "NjQiLCJzaGFwZSI6WzFdLCJkYXRhX29mZnNldHMiOls0MCw0OF19LCJzYW1wbGVfY2UiOnsiZHR5cGUiOiJGMzIiLCJz"
    "aGFwZSI6WzJdLCJkYXRhX29mZnNldHMiOls0OCw1Nl19LCJ0b3BrX2lkcyI6eyJkdHlwZSI6IkkzMiIsInNoYXBlIjpb"
    "MywyXSwiZGF0YV9vZmZzZXRzIjpbNTYsODBdfSwidG9wa192YWx1ZXMiOnsiZHR5cGUiOiJGMTYiLCJzaGFwZSI6WzMs"
    "Ml0sImRhdGFfb2Zmc2V0cyI6WzgwLDkyXX19ICAgICAgIAIAAAAAAAAAAAAAAAAAAAACAAAAAAAAAAMAAAAAAAAAAQAA"
    "AAAAAAAKAAAAAAAAAAAAwD8AAIA+BwAAAAEAAAAAAAAACQAAAAQAAAAFAAAAALgAvgC0AMIAvAC8"
)


def small_arrays() -> dict[str, np.ndarray]:
    return LogitsPayload(
        np.array([[-0.5, -1.5], [-0.25, -3.0], [-1.0, -1.0]], np.float16),
        np.array([[7, 1], [0, 9], [4, 5]], np.int32),
        np.array([0, 2, 3], np.int64),
        np.array([1.5, 0.25], np.float32),
        vocab_size=10,
    ).to_arrays()


def random_payload(seed: int, samples: int = 5, k: int = 8, vocab: int = 50) -> LogitsPayload:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 7, size=samples)
    n = int(lengths.sum())
    values = -np.sort(rng.exponential(2.0, size=(n, k)), axis=1).astype(np.float16)
    ids = np.stack([rng.permutation(vocab)[:k] for _ in range(n)]).reshape(n, k).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ce = rng.uniform(0, 5, size=samples).astype(np.float32)
    return LogitsPayload(values, ids, offsets, ce, vocab_size=vocab)


def assert_equal_payloads(a: LogitsPayload, b: LogitsPayload) -> None:
    assert a.vocab_size == b.vocab_size and a.k == b.k
    for name in ("topk_values", "topk_ids", "offsets", "sample_ce"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_arrays_and_bytes(seed):
    p = random_payload(seed)
    assert_equal_payloads(LogitsPayload.from_arrays(p.to_arrays()), p)
    assert_equal_payloads(LogitsPayload.from_bytes(p.to_bytes()), p)
    assert p.num_samples == 5 and p.lengths.sum() == len(p.topk_values)
    values, ids = p.sample(4)
    assert values.shape == ids.shape == (p.lengths[4], 8)


def test_golden_v1_message_still_decodes_and_encoding_is_stable():
    blob = base64.b64decode(GOLDEN_V1)
    p = LogitsPayload.from_bytes(blob)
    assert p.vocab_size == 10 and p.k == 2 and p.lengths.tolist() == [2, 1]
    assert p.topk_values.tolist() == [[-0.5, -1.5], [-0.25, -3.0], [-1.0, -1.0]]
    assert p.topk_ids.tolist() == [[7, 1], [0, 9], [4, 5]]
    assert p.sample_ce.tolist() == [1.5, 0.25]
    assert p.to_bytes() == blob
    assert PAYLOAD_VERSION == 1


def test_empty_samples_and_unknown_keys_are_accepted():
    arrays = small_arrays()
    arrays["offsets"] = np.array([0, 0, 3], np.int64)  # a sample may have no rows
    arrays["future_field"] = np.zeros(3, np.float32)  # a later version's addition: ignored
    assert LogitsPayload.from_arrays(arrays).lengths.tolist() == [0, 3]


def _with(name, value):
    def change(arrays):
        arrays[name] = value

    return change


def _set(name, index, value):
    def change(arrays):
        arrays[name] = arrays[name].copy()
        arrays[name][index] = value

    return change


def _drop(name):
    def change(arrays):
        del arrays[name]

    return change


INVALID = {
    "nan value": _set("topk_values", (0, 1), np.nan),
    "inf value": _set("topk_values", (0, 0), np.inf),
    "-inf value": _set("topk_values", (0, 1), -np.inf),
    "positive log-prob": _set("topk_values", (0, 0), 0.5),
    "negative id": _set("topk_ids", (1, 0), -1),
    "id = vocab_size": _set("topk_ids", (1, 1), 10),
    "k > vocab_size": _with("vocab_size", np.array([1], np.int64)),
    "vocab_size 0": _with("vocab_size", np.array([0], np.int64)),
    "k disagrees": _with("k", np.array([3], np.int64)),
    "offsets not from 0": _with("offsets", np.array([1, 2, 3], np.int64)),
    "offsets end short": _with("offsets", np.array([0, 1, 2], np.int64)),
    "offsets decreasing": _with("offsets", np.array([0, 4, 3], np.int64)),
    "offsets empty": _with("offsets", np.zeros(0, np.int64)),
    "ce length": _with("sample_ce", np.array([1.0], np.float32)),
    "ce nan": _set("sample_ce", 0, np.nan),
    "ce negative": _set("sample_ce", 1, -0.5),
    "values float32": _with("topk_values", np.zeros((3, 2), np.float32)),
    "ids int64": _with("topk_ids", np.array([[7, 1], [0, 9], [4, 5]], np.int64)),
    "offsets int32": _with("offsets", np.array([0, 2, 3], np.int32)),
    "ce float64": _with("sample_ce", np.array([1.5, 0.25], np.float64)),
    "values 1-d": _with("topk_values", np.zeros(6, np.float16)),
    "ids shape": _with("topk_ids", np.zeros((3, 1), np.int32)),
    "values ascending": _set("topk_values", (1, 1), -0.125),
    "duplicate ids": _set("topk_ids", (2, 1), 4),
    "missing ids": _drop("topk_ids"),
    "missing version": _drop("version"),
    "newer version": _with("version", np.array([PAYLOAD_VERSION + 1], np.int64)),
    "version 0": _with("version", np.array([0], np.int64)),
    "vocab_size float": _with("vocab_size", np.array([10.0])),
    "k two entries": _with("k", np.array([2, 2], np.int64)),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_every_invalid_payload_raises(case):
    arrays = small_arrays()
    LogitsPayload.from_arrays(arrays)  # the unchanged payload is valid
    INVALID[case](arrays)
    with pytest.raises(PayloadError):
        LogitsPayload.from_arrays(arrays)
    with pytest.raises(PayloadError):  # the same through the wire format
        LogitsPayload.from_bytes(pack_state(arrays))


def test_payload_error_family_and_garbage_bytes():
    assert issubclass(PayloadError, AlgorithmError) and issubclass(PayloadError, ValueError)
    with pytest.raises(PayloadError, match="safetensors"):
        LogitsPayload.from_bytes(b"\x00garbage")
    a = small_arrays()
    with pytest.raises(PayloadError, match="vocab_size"):  # a bool is not a size
        LogitsPayload(a["topk_values"], a["topk_ids"], a["offsets"], a["sample_ce"], True)
    with pytest.raises(PayloadError, match="offsets must be a 1-d int64"):
        LogitsPayload(a["topk_values"], a["topk_ids"], [0, 2, 3], a["sample_ce"], 10)


# --------------------------------------------------------------------------------------------
# building from logits


def test_payload_from_logits_by_hand():
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen) * 3
    input_ids = torch.tensor([[1, 4, 2, 6, 0], [0, 0, 3, 5, 1]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right- and left-padded
    p = payload_from_logits(logits, input_ids, mask, k=3)
    assert p.vocab_size == 7 and p.k == 3 and p.lengths.tolist() == [2, 2]

    # sample 0: attended positions 0, 1, 2 -> rows = logits at 0 and 1, labels = tokens 4, 2
    # sample 1: attended positions 2, 3, 4 -> rows = logits at 2 and 3, labels = tokens 5, 1
    rows = [(0, 0, 4), (0, 1, 2), (1, 2, 5), (1, 3, 1)]
    for r, (b, t, _) in enumerate(rows):
        top = torch.topk(torch.log_softmax(logits[b, t], -1), 3)
        np.testing.assert_allclose(p.topk_values[r], top.values.numpy(), rtol=1e-3, atol=1e-3)
        assert p.topk_ids[r].tolist() == top.indices.tolist()
        assert p.topk_ids[r].tolist() == torch.topk(logits[b, t], 3).indices.tolist()
    for s in range(2):
        nll = [-torch.log_softmax(logits[b, t], -1)[label] for b, t, label in rows if b == s]
        assert p.sample_ce[s] == pytest.approx(float(sum(nll) / len(nll)), rel=1e-5)

    full = payload_from_logits(logits, input_ids, None, k=7)  # no mask: every position
    assert full.lengths.tolist() == [4, 4] and sorted(full.topk_ids[0].tolist()) == list(range(7))
    padded = payload_from_logits(logits, input_ids.clamp(max=4), mask, k=2, vocab_size=5)
    assert padded.topk_ids.max() < 5  # logits columns past vocab_size are ignored


def test_payload_from_logits_clamps_to_float16():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[[0.0, 1e6, -1e6], [0.0, 0.0, 0.0]]])  # log p = 0, -1e6, -2e6
    p = payload_from_logits(logits, torch.tensor([[1, 2]]), k=3)
    assert p.topk_ids.tolist() == [[1, 0, 2]]
    assert p.topk_values.tolist() == [[0.0, -65504.0, -65504.0]]  # finite: probability 0 anyway
    assert p.sample_ce.tolist() == [2e6]  # the CE uses the unclamped float32 log-probability


def test_payload_from_logits_errors():
    torch = pytest.importorskip("torch")
    logits = torch.zeros(1, 3, 4)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(PayloadError, match="k=5"):
        payload_from_logits(logits, ids, k=5)
    with pytest.raises(PayloadError, match="attended"):
        payload_from_logits(logits, ids, torch.tensor([[0, 0, 1]]), k=2)
    with pytest.raises(PayloadError, match="NaN"):
        payload_from_logits(logits.index_fill(2, torch.tensor([0]), float("nan")), ids, k=2)
    with pytest.raises(PayloadError, match="outside"):
        payload_from_logits(logits, ids, k=2, vocab_size=3)  # token 3 is not in a 3-token vocab
    with pytest.raises(PayloadError):
        payload_from_logits(logits, ids[:, :2], k=2)
