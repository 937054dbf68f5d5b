"""Device profiles: the bundled data loads and validates, lookups, errors, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firmware_profiles.cli import profiles_cli
from firmware_profiles.errors import ProfileError, UnknownProfileError
from firmware_profiles.profiles import (
    DEVICES_JSON,
    GIB,
    DeviceProfile,
    get_profile,
    host_memory,
    list_profiles,
    load_profiles,
)

# id -> (memory GiB, compute capability, JetPack major, Python)
JETSONS = {
    "jetson-nano-4gb": (4, "5.3", 4, "3.6"),
    "jetson-tx2-8gb": (8, "6.2", 4, "3.6"),
    "xavier-nx-8gb": (8, "7.2", 5, "3.8"),
    "xavier-nx-16gb": (16, "7.2", 5, "3.8"),
    "agx-xavier-32gb": (32, "7.2", 5, "3.8"),
    "agx-xavier-64gb": (64, "7.2", 5, "3.8"),
    "orin-nano-4gb": (4, "8.7", 6, "3.10"),
    "orin-nano-4gb-super": (4, "8.7", 6, "3.10"),
    "orin-nano-8gb": (8, "8.7", 6, "3.10"),
    "orin-nano-8gb-super": (8, "8.7", 6, "3.10"),
    "orin-nx-8gb": (8, "8.7", 6, "3.10"),
    "orin-nx-8gb-super": (8, "8.7", 6, "3.10"),
    "orin-nx-16gb": (16, "8.7", 6, "3.10"),
    "orin-nx-16gb-super": (16, "8.7", 6, "3.10"),
    "agx-orin-32gb": (32, "8.7", 6, "3.10"),
    "agx-orin-64gb": (64, "8.7", 6, "3.10"),
}


def test_bundled_file_is_package_data_and_loads():
    assert DEVICES_JSON.is_file() and DEVICES_JSON.parent.name == "firmware_profiles"
    profs = load_profiles()
    assert set(JETSONS) <= set(profs)
    assert {"generic-cpu", "cuda-8gb", "cuda-24gb", "cuda-80gb"} <= set(profs)
    for p in profs.values():
        assert isinstance(p, DeviceProfile)
        assert p.memory_bytes > p.os_reserved_bytes >= 0
        assert p.training_note and p.bitsandbytes_note and p.onnxruntime_note


@pytest.mark.parametrize("pid", sorted(JETSONS))
def test_every_jetson_is_plausible(pid):
    mem_gib, cc, jp_major, py = JETSONS[pid]
    p = get_profile(pid)
    assert p.kind == "jetson" and p.accelerator == "cuda" and p.unified_memory
    assert p.memory_bytes == mem_gib * GIB
    assert p.compute_capability == cc
    assert p.jetpack.split(".")[0] == str(jp_major) and p.l4t and p.cuda_version
    assert p.python_version == py
    # OS + carve-outs keep between 0.3 and 3 GiB; what is left is most of the module
    assert 0.3 * GIB <= p.os_reserved_bytes <= 3 * GIB
    assert 0.7 * p.memory_bytes <= p.available_bytes() < p.memory_bytes
    # Ampere (8.x) has bf16, Maxwell/Pascal/Volta do not; all have fp16
    assert p.bf16 == (cc == "8.7") and p.fp16
    # training only on JetPack 6 (Python >= 3.10), with a reason otherwise
    assert p.training_supported == (jp_major == 6)
    if not p.training_supported:
        assert "Python" in p.training_note
    # bitsandbytes: usable (with a build note) only on Orin; ONNX Runtime GPU wheels everywhere
    assert p.bitsandbytes_usable == (cc == "8.7")
    assert p.onnxruntime_gpu
    if p.bitsandbytes_usable:
        assert "87" in p.bitsandbytes_note or "8.7" in p.bitsandbytes_note
    assert p.tops is not None and p.tops > 0 and p.tops_note
    assert p.power_modes
    assert p.cuda_context_bytes > 0 and p.cuda_context_note


def test_super_variants_share_memory_and_raise_tops():
    for p in list_profiles(kind="jetson"):
        if p.super_mode:
            base = get_profile(p.base_profile)
            assert base.memory_bytes == p.memory_bytes
            assert base.os_reserved_bytes == p.os_reserved_bytes
            assert p.tops > base.tops
            assert not base.super_mode


def test_default_quant_follows_bitsandbytes_and_bf16():
    assert get_profile("orin-nano-8gb").default_quant() == "nf4"
    assert get_profile("xavier-nx-8gb").default_quant() == "fp16"  # no bnb, no bf16
    assert get_profile("jetson-nano-4gb").default_quant() == "fp16"
    assert get_profile("cuda-24gb").default_quant() == "nf4"
    no_bnb = get_profile("orin-nx-16gb").with_overrides(bitsandbytes_usable=False)
    assert no_bnb.default_quant() == "bf16"
    cpu = get_profile("generic-cpu").with_overrides(bitsandbytes_usable=False)
    assert cpu.default_quant() == "fp32"


def test_compute_dtype_mirrors_the_loader():
    orin, xav, cpu = get_profile("orin-nano-8gb"), get_profile("xavier-nx-8gb"), get_profile("cpu")
    assert orin.compute_dtype("nf4") == "bf16" and xav.compute_dtype("nf4") == "fp16"
    assert orin.compute_dtype("int8") == "fp16"
    assert cpu.compute_dtype("nf4") == "fp32" and cpu.compute_dtype("bf16") == "bf16"
    with pytest.raises(ProfileError):
        orin.compute_dtype("fp8")


def test_generic_cpu_reads_this_host():
    total, avail = host_memory()
    p = get_profile("generic-cpu")
    assert p.kind == "cpu" and p.accelerator == "cpu" and p.memory_from_host
    assert abs(p.memory_bytes - total) < 64 << 20
    assert 0 < p.available_bytes() <= p.memory_bytes
    assert abs(p.available_bytes() - avail) < GIB  # other processes come and go


def test_generic_cuda_profiles_budget_gpu_memory_only():
    for gb in (8, 24, 80):
        p = get_profile(f"cuda-{gb}gb")
        assert p.memory_bytes == gb * GIB and not p.unified_memory and p.bf16
    assert get_profile("x86-cuda-24gb").id == "cuda-24gb"


def test_aliases_and_case():
    assert get_profile("orin-nano").id == "orin-nano-8gb"
    assert get_profile("ORIN_NANO_4GB").id == "orin-nano-4gb"
    assert get_profile(" agx-orin ").id == "agx-orin-64gb"
    p = get_profile("tx2")
    assert get_profile(p) is p


def test_unknown_id_lists_close_matches():
    with pytest.raises(UnknownProfileError) as ei:
        get_profile("orin-nano-16gb")
    err = ei.value
    assert isinstance(err, ProfileError) and isinstance(err, KeyError)
    assert "orin-nano-8gb" in err.suggestions
    assert "orin-nano-8gb" in str(err) and "did you mean" in str(err)
    with pytest.raises(UnknownProfileError) as ei:
        get_profile("raspberry-pi")
    assert "jetson-nano-4gb" in str(ei.value)  # no close match: the known ids are listed
    with pytest.raises(ProfileError):
        get_profile("")


def test_available_bytes_arithmetic():
    p = get_profile("orin-nano-8gb")
    assert p.available_bytes() == p.memory_bytes - p.os_reserved_bytes
    assert p.available_bytes(256 << 20) == p.memory_bytes - p.os_reserved_bytes - (256 << 20)
    assert p.available_bytes(100 * GIB) == 0
    with pytest.raises(ProfileError):
        p.available_bytes(-1)


def test_overrides_are_validated():
    p = get_profile("orin-nano-4gb")
    q = p.with_overrides(os_reserved_bytes=GIB)
    assert q.available_bytes() == 3 * GIB and p.os_reserved_bytes != GIB
    with pytest.raises(ProfileError):
        p.with_overrides(os_reserved_bytes=5 * GIB)
    with pytest.raises(ProfileError):
        p.with_overrides(no_such_field=1)
    with pytest.raises(ProfileError):
        p.with_overrides(compute_capability="7.2")  # bf16 on Volta is impossible


def _write(tmp_path: Path, doc: dict) -> Path:
    f = tmp_path / "devices.json"
    f.write_text(json.dumps(doc))
    return f


def _minimal_profile(**kw) -> dict:
    d = {
        "id": "dev",
        "name": "Dev",
        "kind": "cuda",
        "accelerator": "cuda",
        "memory_gib": 8,
        "unified_memory": False,
        "os_reserved_gib": 0.5,
        "os_reserved_note": "n",
        "memory_type": None,
        "memory_bandwidth_gbps": None,
        "gpu_arch": "Ampere",
        "compute_capability": "8.6",
        "gpu_cuda_cores": None,
        "gpu_tensor_cores": None,
        "cuda_version": "12.4",
        "jetpack": None,
        "l4t": None,
        "ubuntu": None,
        "python_version": "3.11",
        "bf16": True,
        "fp16": True,
        "training_supported": True,
        "training_note": "t",
        "bitsandbytes_usable": True,
        "bitsandbytes_note": "b",
        "onnxruntime_gpu": True,
        "onnxruntime_note": "o",
        "cuda_context_gib": 0.5,
        "cuda_context_note": "c",
    }
    d.update(kw)
    return d


def test_loader_accepts_a_valid_custom_file(tmp_path):
    profs = load_profiles(_write(tmp_path, {"schema": 1, "profiles": [_minimal_profile()]}))
    assert profs["dev"].available_bytes() == int(7.5 * GIB)


@pytest.mark.parametrize(
    "mutation, message",
    [
        ({"compute_capability": "eight"}, "compute_capability"),
        ({"memory_gib": -1}, "memory"),
        ({"os_reserved_gib": 9}, "os_reserved"),
        ({"kind": "fpga"}, "kind"),
        ({"bf16": "yes"}, "bf16"),
        ({"software": "jetpack9"}, "software stack"),
        ({"training_note": ""}, "training_note"),
        ({"tops": -3}, "tops"),
        ({"kind": "jetson", "unified_memory": True}, "Jetson profiles need"),
    ],
)
def test_loader_rejects_bad_profiles(tmp_path, mutation, message):
    doc = {"schema": 1, "profiles": [_minimal_profile(**mutation)]}
    with pytest.raises(ProfileError, match=message):
        load_profiles(_write(tmp_path, doc))


def test_loader_rejects_bad_files(tmp_path):
    with pytest.raises(ProfileError, match="schema"):
        load_profiles(_write(tmp_path, {"schema": 2, "profiles": []}))
    dup = {"schema": 1, "profiles": [_minimal_profile(), _minimal_profile()]}
    with pytest.raises(ProfileError, match="used by both"):
        load_profiles(_write(tmp_path, dup))
    missing = _minimal_profile()
    del missing["onnxruntime_note"]
    with pytest.raises(ProfileError):
        load_profiles(_write(tmp_path, {"schema": 1, "profiles": [missing]}))
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read"):
        load_profiles(bad)


def test_profiles_cli(capsys):
    assert profiles_cli(["list"]) == 0
    out = capsys.readouterr().out
    assert "orin-nano-8gb" in out and "jetson-nano-4gb" in out
    assert profiles_cli(["list", "--kind", "jetson", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["id"] for r in rows} == set(JETSONS)
    assert profiles_cli(["show", "orin-nano-8gb"]) == 0
    out = capsys.readouterr().out
    assert "8.7" in out and "JetPack 6" in out and "bitsandbytes" in out
    assert profiles_cli(["show", "xavier-nx-8gb", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["training_supported"] is False and d["python_version"] == "3.8"
    assert profiles_cli(["show", "orin-nano-16gb"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert profiles_cli(["bogus"]) == 2
