"""Validation and aggregation rules against closed forms worked out by hand.

Tolerances are stated per test: "exact" where every intermediate is representable in float64
(small integers, or x * small integer), ``rtol=1e-12`` in float64 and 1 ulp in float32 where
only the summation order differs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from aggregator.aggregation import (
    AGGREGATORS,
    CoordinateMedian,
    TrimmedMean,
    WeightedMean,
    aggregator_from_state,
    make_aggregator,
)
from aggregator.errors import AggregatorError, InvalidUpdate, SpecError, StateError
from aggregator.state import CheckpointStore
from aggregator.validation import UpdateSpec, encode, to_float64, validate_update


def f32(*rows: object) -> np.ndarray:
    return np.array(rows, dtype=np.float32)


@pytest.fixture
def spec() -> UpdateSpec:
    zeros = {"lora_A": np.zeros((2, 2), np.float32), "lora_B": np.zeros(3, np.float16)}
    return UpdateSpec.from_state(zeros)


def update(a: list[list[float]], b: list[float]) -> dict[str, np.ndarray]:
    return {"lora_A": np.array(a, np.float32), "lora_B": np.array(b, np.float16)}


# --------------------------------------------------------------------------- validation


def test_spec_infers_float_dtypes_and_requires_declared_bfloat16() -> None:
    state = {
        "a": np.zeros(2, np.float32),
        "b": np.zeros((), np.float16),
        "c": np.zeros(4, np.uint16),
    }
    with pytest.raises(SpecError, match="declare bfloat16"):
        UpdateSpec.from_state(state)
    spec = UpdateSpec.from_state(state, declared={"c": "bfloat16"})
    assert {n: (t.shape, t.dtype) for n, t in spec.tensors.items()} == {
        "a": ((2,), "float32"),
        "b": ((), "float16"),
        "c": ((4,), "bfloat16"),
    }
    assert UpdateSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecError):
        UpdateSpec.from_state({"d": np.zeros(2, np.float64)})


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda u: u.pop("lora_B"), "names"),
        (lambda u: u.update(extra=np.zeros(1, np.float32)), "names"),
        (lambda u: u.update(lora_A=np.zeros((2, 3), np.float32)), "shape"),
        (lambda u: u.update(lora_A=np.zeros((2, 2), np.float64)), "dtype"),
        (lambda u: u.update(lora_B=[0.0, 0.0, 0.0]), "dtype"),
        (lambda u: u.update(lora_A=f32([0, np.nan], [0, 0])), "non_finite"),
        (lambda u: u.update(lora_B=np.array([0, -np.inf, 0], np.float16)), "non_finite"),
    ],
)
def test_validate_rejects_with_reason(spec: UpdateSpec, mutate, reason: str) -> None:
    u = update([[0, 0], [0, 0]], [0, 0, 0])
    mutate(u)
    with pytest.raises(InvalidUpdate) as err:
        validate_update(u, spec, client="dev-1")
    assert err.value.reason == reason
    assert "dev-1" in str(err.value)


def test_norm_is_of_the_delta_to_the_reference() -> None:
    ref = {"w": f32(1, 1)}
    spec = UpdateSpec.from_state(ref)
    v = validate_update({"w": f32(4, 5)}, spec)  # delta (3, 4): norm 5, exact
    assert v.norm == 5.0 and not v.clipped
    assert validate_update(
        {"w": f32(4, 5)}, UpdateSpec.from_state(ref, keep_reference=False)
    ).norm == math.hypot(4, 5)


def test_norm_bound_rejects_or_clips_without_touching_the_input() -> None:
    spec = UpdateSpec.from_state({"w": f32(1, 1)})
    arr = f32(4, 5)
    before = arr.copy()
    with pytest.raises(InvalidUpdate) as err:
        validate_update({"w": arr}, spec, max_norm=1.0)
    assert err.value.reason == "norm"

    v = validate_update({"w": arr}, spec, max_norm=1.0, clip=True)
    # delta (3, 4) scaled to norm 1: (0.6, 0.8); plus the reference (1, 1). float32 rounding only.
    np.testing.assert_allclose(v.tensors["w"], [1.6, 1.8], rtol=1e-7)
    assert v.clipped and v.norm == 5.0 and v.tensors["w"].dtype == np.float32
    np.testing.assert_array_equal(arr, before)
    assert arr.flags.writeable and not v.tensors["w"].flags.writeable

    inside = validate_update({"w": arr}, spec, max_norm=10.0, clip=True)
    assert not inside.clipped and np.shares_memory(inside.tensors["w"], arr)  # no copy
    with pytest.raises(ValueError):
        inside.tensors["w"][0] = 0.0


def test_bfloat16_bits_round_to_nearest_even_and_validate() -> None:
    one_and_half_ulp = [1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5]
    # ties to even: 1+2^-8 -> 1.0, 1+3*2^-8 -> 1+2^-6 (bf16 has 7 mantissa bits)
    np.testing.assert_array_equal(
        to_float64(encode(np.array(one_and_half_ulp), "bfloat16"), "bfloat16"),
        [1.0, 1.0, 1 + 2**-6, -2.5],
    )
    spec = UpdateSpec.from_state({"w": np.zeros(2, np.uint16)}, declared={"w": "bfloat16"})
    ok = validate_update({"w": encode(np.array([3.0, 4.0]), "bfloat16")}, spec)
    assert ok.norm == 5.0
    inf_bits = encode(np.array([1.0, np.inf]), "bfloat16")
    with pytest.raises(InvalidUpdate) as err:
        validate_update({"w": inf_bits}, spec)
    assert err.value.reason == "non_finite"
    with pytest.raises(InvalidUpdate) as err:
        validate_update({"w": np.zeros(2, np.float32)}, spec)
    assert err.value.reason == "dtype"


# --------------------------------------------------------------------------- WeightedMean


def test_weighted_mean_closed_form(spec: UpdateSpec) -> None:
    w0 = update([[1, 2], [3, 4]], [0.5, 1, -2])
    w1 = update([[4, 5], [6, 7]], [2, 4, 1])
    agg = make_aggregator("fedavg")
    agg.begin(spec)
    agg.add("c0", w0, weight=1)
    agg.add("c1", w1, weight=2)
    out = agg.result()
    # (w0*1 + w1*2) / 3, worked by hand; exact (every intermediate is a small dyadic number)
    np.testing.assert_array_equal(out["lora_A"], f32([3, 4], [5, 6]))
    np.testing.assert_array_equal(out["lora_B"], np.array([4.5 / 3, 3, 0], np.float16))
    assert out["lora_A"].dtype == np.float32 and out["lora_B"].dtype == np.float16
    assert agg.count == 2 and agg.clients == ("c0", "c1") and agg.total_weight == 3.0


def test_weighted_mean_bfloat16(spec: UpdateSpec) -> None:
    spec = UpdateSpec.from_state({"w": np.zeros(2, np.uint16)}, declared={"w": "bfloat16"})
    agg = WeightedMean()
    agg.begin(spec)
    agg.add("a", {"w": encode(np.array([1.0, -4.0]), "bfloat16")}, 1)
    agg.add("b", {"w": encode(np.array([2.0, 8.0]), "bfloat16")}, 1)
    out = agg.result()
    assert out["w"].dtype == np.uint16
    np.testing.assert_array_equal(to_float64(out["w"], "bfloat16"), [1.5, 2.0])  # exact


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_identical_updates_aggregate_to_themselves(name: str, spec: UpdateSpec, tmp_path) -> None:
    rng = np.random.default_rng(7)
    x = {
        "lora_A": rng.standard_normal((2, 2)).astype(np.float32),
        "lora_B": rng.standard_normal(3).astype(np.float16),
    }
    kw = {} if name == "fedavg" else {"spill_dir": tmp_path}
    agg = make_aggregator(name, **kw)
    agg.begin(spec)
    for i, w in enumerate([1, 3, 7]):
        agg.add(f"c{i}", x, weight=w)
    out = agg.result()
    # exact: k*x is exact in float64 for small k, and (11x)/11 rounds back to x
    for n in x:
        np.testing.assert_array_equal(out[n], x[n])


def test_weighted_mean_is_order_independent(spec: UpdateSpec) -> None:
    rng = np.random.default_rng(11)
    ups = [
        (
            f"c{i}",
            update(rng.standard_normal((2, 2)).tolist(), rng.standard_normal(3).tolist()),
            float(rng.integers(1, 100)),
        )
        for i in range(6)
    ]
    results = []
    for order in itertools.islice(itertools.permutations(ups), 0, 720, 97):
        agg = WeightedMean()
        agg.begin(spec)
        for c, u, w in order:
            agg.add(c, u, w)
        results.append((agg.result(cast=False), agg.result()))
    first64, first = results[0]
    for r64, r in results[1:]:
        for n in first:
            np.testing.assert_allclose(r64[n], first64[n], rtol=1e-12, atol=1e-15)  # float64 sums
            np.testing.assert_array_max_ulp(r[n], first[n], maxulp=1)  # after the final rounding


def test_weighted_mean_refuses_without_trace(spec: UpdateSpec) -> None:
    agg = WeightedMean()
    with pytest.raises(AggregatorError, match="begin"):
        agg.add("c0", update([[1, 1], [1, 1]], [1, 1, 1]))
    agg.begin(spec)
    with pytest.raises(AggregatorError, match="no updates"):
        agg.result()
    agg.add("c0", update([[1, 1], [1, 1]], [1, 1, 1]), 2)
    bad = [
        ("c0", update([[9, 9], [9, 9]], [9, 9, 9]), 1, "duplicate"),
        ("c1", update([[9, 9], [9, 9]], [9, 9, 9]), 0, "weight"),
        ("c1", update([[9, 9], [9, 9]], [9, 9, 9]), float("nan"), "weight"),
        ("c1", {"lora_A": np.zeros((2, 2), np.float32)}, 1, "names"),
        (
            "c1",
            {"lora_A": np.zeros((2, 2), np.float32), "lora_B": np.zeros(4, np.float16)},
            1,
            "shape",
        ),
    ]
    for client, u, w, reason in bad:
        with pytest.raises(InvalidUpdate) as err:
            agg.add(client, u, w)
        assert err.value.reason == reason
    assert agg.count == 1
    np.testing.assert_array_equal(agg.result()["lora_A"], np.ones((2, 2), np.float32))


def test_checkpoint_midway_then_resume_is_bit_identical(spec: UpdateSpec, tmp_path) -> None:
    rng = np.random.default_rng(3)
    ups = [
        (
            f"c{i}",
            update(rng.standard_normal((2, 2)).tolist(), rng.standard_normal(3).tolist()),
            float(rng.uniform(1, 50)),
        )
        for i in range(6)
    ]
    straight = WeightedMean()
    straight.begin(spec)
    for c, u, w in ups:
        straight.add(c, u, w)

    first = WeightedMean()
    first.begin(spec)
    for c, u, w in ups[:3]:
        first.add(c, u, w)
    store = CheckpointStore(tmp_path)  # a real round trip through a safetensors file
    digest = store.put(first.state_dict().tensors, first.state_dict().meta)
    resumed = aggregator_from_state(store.get(digest))
    assert isinstance(resumed, WeightedMean) and resumed.clients == ("c0", "c1", "c2")
    for c, u, w in ups[3:]:
        resumed.add(c, u, w)
    with pytest.raises(InvalidUpdate):
        resumed.add("c0", ups[0][1], 1.0)  # the client list is restored too
    for n in spec.tensors:
        np.testing.assert_array_equal(resumed.result(cast=False)[n], straight.result(cast=False)[n])
        np.testing.assert_array_equal(resumed.result()[n], straight.result()[n])
    assert resumed.total_weight == straight.total_weight


def test_state_of_another_rule_is_refused(spec: UpdateSpec, tmp_path) -> None:
    agg = WeightedMean()
    agg.begin(spec)
    with pytest.raises(StateError):
        TrimmedMean(0.1, spill_dir=tmp_path).load_state_dict(agg.state_dict())
    t = TrimmedMean(0.1, spill_dir=tmp_path)
    t.begin(spec)
    with pytest.raises(StateError, match="trim_fraction"):
        TrimmedMean(0.2, spill_dir=tmp_path).load_state_dict(t.state_dict())


# --------------------------------------------------------------------------- robust rules

ROBUST = {  # one tensor "w" of 3 coordinates, values worked by hand below
    "a": [1, 5, -1],
    "b": [2, 3, 10],
    "c": [9, 4, 0],
    "d": [4, 0, 2],
    "e": [100, 1, 3],
}
W_SPEC = UpdateSpec.from_state({"w": np.zeros(3, np.float32)})


def fold(agg, clients: str, weights: list[float] | None = None):
    agg.begin(W_SPEC)
    for i, c in enumerate(clients):
        agg.add(c, {"w": f32(*ROBUST[c])}, (weights or [1.0] * len(clients))[i])
    return agg


def test_coordinate_median_of_three_and_four(tmp_path) -> None:
    # sorted columns for a,b,c: [1,2,9] [3,4,5] [-1,0,10] -> 2, 4, 0 (exact)
    agg = fold(CoordinateMedian(tmp_path / "s3"), "abc", weights=[1, 100, 1])  # weights ignored
    np.testing.assert_array_equal(agg.result()["w"], f32(2, 4, 0))
    # plus d: [1,2,4,9] [0,3,4,5] [-1,0,2,10] -> (2+4)/2, (3+4)/2, (0+2)/2 (exact)
    agg.add("d", {"w": f32(*ROBUST["d"])})
    np.testing.assert_array_equal(agg.result()["w"], f32(3, 3.5, 1))
    assert len(list((tmp_path / "s3").glob("*.safetensors"))) == 4  # spilled, one per client


def test_trimmed_mean_closed_forms(tmp_path) -> None:
    # trim 0.25 of 4 clients drops 1 per side: mean of (2,4), (3,4), (0,2) -> 3, 3.5, 1 (exact)
    agg = fold(TrimmedMean(0.25, spill_dir=tmp_path / "t4"), "abcd")
    assert agg.trimmed_per_side(4) == 1
    np.testing.assert_array_equal(agg.result()["w"], f32(3, 3.5, 1))
    # trim 0.2 of 5 drops 1 per side: [1,2,4,9,100] [0,1,3,4,5] [-1,0,2,3,10]
    # -> (2+4+9)/3 = 5, (1+3+4)/3 = 8/3, (0+2+3)/3 = 5/3 (float32 rounding of the float64 mean)
    agg = fold(TrimmedMean(0.2, spill_dir=tmp_path / "t5"), "abcde")
    np.testing.assert_array_equal(agg.result()["w"], f32(5, 8 / 3, 5 / 3))
    # trim 0 is the plain (unweighted) mean: (1+2+9+4+100)/5 = 23.2
    agg = fold(TrimmedMean(0.0, spill_dir=tmp_path / "t0"), "abcde")
    np.testing.assert_allclose(agg.result(cast=False)["w"], [23.2, 13 / 5, 14 / 5], rtol=1e-15)
    with pytest.raises(SpecError):
        TrimmedMean(0.5)


@pytest.mark.parametrize("rule", [CoordinateMedian, lambda d: TrimmedMean(0.2, spill_dir=d)])
def test_robust_rules_order_independent_and_resumable(rule, tmp_path) -> None:
    reference = fold(rule(tmp_path / "ref"), "abcde").result()
    shuffled = fold(rule(tmp_path / "shuf"), "ecadb").result()
    np.testing.assert_array_equal(shuffled["w"], reference["w"])  # exact: sorting is order-free

    spill = tmp_path / "resume"
    half = fold(rule(spill), "abc")
    resumed = aggregator_from_state(half.state_dict(), spill_dir=spill)
    for c in "de":
        resumed.add(c, {"w": f32(*ROBUST[c])})
    np.testing.assert_array_equal(resumed.result()["w"], reference["w"])

    state = resumed.state_dict()
    resumed.discard()
    assert not list(spill.glob("*.safetensors"))
    with pytest.raises(StateError, match="missing"):
        aggregator_from_state(state, spill_dir=spill)


def test_robust_rule_without_spill_dir_cleans_up() -> None:
    agg = fold(CoordinateMedian(), "abc")
    directory = agg.spill_dir
    assert directory.is_dir()
    agg.discard()
    assert not directory.exists()


# --------------------------------------------------------------------------- registry


def test_registry() -> None:
    assert isinstance(make_aggregator("fedavg"), WeightedMean)
    assert make_aggregator("trimmed_mean", trim_fraction=0.3).params() == {"trim_fraction": 0.3}
    with pytest.raises(SpecError, match="fedavg, median, trimmed_mean"):
        make_aggregator("krum")
    with pytest.raises(SpecError, match="bad options"):
        make_aggregator("fedavg", trim_fraction=0.1)
