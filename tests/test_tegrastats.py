"""tegrastats parsing on recorded lines of several Jetson families / JetPack releases (numbers
checked by hand), summaries against hand-computed means and energy, and the sampler: its
absence path and its subprocess path driven by a stand-in ``tegrastats`` script."""

from __future__ import annotations

import os
import stat
import time
from datetime import datetime
from types import SimpleNamespace

import pytest

from edge_sdk.tegrastats import (
    CpuCore,
    PowerRail,
    TegraSample,
    TegraSampler,
    TegrastatsParseError,
    _sample_from_jtop,
    parse_tegrastats_line,
    summarize_samples,
)

MIB = 1 << 20

# Jetson Nano 4GB, JetPack 4.6 (L4T 32.7): POM_* rails without units, IRAM, one GPU clock
NANO = (
    "RAM 2268/3964MB (lfb 121x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [17%@1479,6%@1479,11%@1479,7%@1479] EMC_FREQ 4%@1600 GR3D_FREQ 0%@921 APE 25 "
    "PLL@34C CPU@36.5C PMIC@100C GPU@35.5C AO@44C thermal@35.75C "
    "POM_5V_IN 2473/2473 POM_5V_GPU 0/0 POM_5V_CPU 498/498"
)
# Jetson TX2, JetPack 4: two parked Denver cores, VDD_IN listed after other rails
TX2 = (
    "RAM 2811/7852MB (lfb 1032x4MB) SWAP 0/3926MB (cached 0MB) "
    "CPU [2%@345,off,off,0%@345,1%@345,1%@345] EMC_FREQ 3%@1866 GR3D_FREQ 0%@114 APE 150 "
    "PLL@35C MCPU@35C PMIC@100C Tboard@32C GPU@33.5C BCPU@35C thermal@34.3C Tdiode@32.5C "
    "VDD_SYS_GPU 152/152 VDD_SYS_SOC 457/457 VDD_4V0_WIFI 0/0 VDD_IN 1829/1829 "
    "VDD_SYS_CPU 152/152 VDD_SYS_DDR 305/305"
)
# Xavier NX, JetPack 5.1: mW suffix, VDD_IN + VDD_CPU_GPU_CV + VDD_SOC
XAVIER_NX = (
    "RAM 2004/6854MB (lfb 914x4MB) SWAP 0/3427MB (cached 0MB) "
    "CPU [1%@1190,0%@1190,1%@1190,0%@1190,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 0%@114 "
    "VIC_FREQ 115 APE 150 AUX@32.5C CPU@34C thermal@33.05C AO@33C GPU@33C PMIC@50C "
    "VDD_IN 3832mW/3832mW VDD_CPU_GPU_CV 460mW/460mW VDD_SOC 1226mW/1226mW"
)
# Xavier NX, JetPack 4.6 run without root: clocks of EMC and GPU hidden
XAVIER_NX_NOROOT = (
    "RAM 2364/7772MB (lfb 1011x4MB) SWAP 0/3886MB (cached 0MB) "
    "CPU [4%@1190,2%@1190,1%@1190,1%@1190,off,off] EMC_FREQ 0% GR3D_FREQ 0% "
    "AUX@32C CPU@34C thermal@32.65C AO@33C GPU@33C PMIC@100C "
    "VDD_IN 3958/3958 VDD_CPU_GPU_CV 572/572 VDD_SOC 1183/1183"
)
# AGX Orin 32GB, JetPack 5.1, training: 12 cores (4 parked), one clock per GPC, switched-off
# sensors at -256C, no input rail (total = sum of rails)
AGX_ORIN = (
    "RAM 18233/30536MB (lfb 3214x4MB) SWAP 0/15268MB (cached 0MB) "
    "CPU [12%@2201,8%@2201,100%@2201,5%@2201,3%@2201,0%@2201,1%@2201,2%@2201,off,off,off,off] "
    "EMC_FREQ 41%@3199 GR3D_FREQ 97%@[1300,1300] VIC_FREQ 729 APE 174 CV0@-256C CPU@51.593C "
    "Tboard@37C SOC2@48.25C Tdiode@40.5C SOC0@49.031C CV1@-256C GPU@52.5C tj@52.5C "
    "SOC1@47.968C CV2@-256C VDD_GPU_SOC 14391mW/12874mW VDD_CPU_CV 2793mW/2611mW "
    "VIN_SYS_5V0 5447mW/5339mW VDDQ_VDD2_1V8AO 1910mW/1806mW"
)
# Orin Nano 8GB, JetPack 6 (L4T 36): timestamp prefix, lower-case sensors, engines "off"
ORIN_NANO_JP6 = (
    "11-22-2026 10:00:00 RAM 2359/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [2%@729,1%@729,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 GR3D_FREQ 0%@[305] "
    "NVDEC off NVJPG off NVJPG1 off VIC off OFA off APE 200 cpu@48.375C soc2@47.281C "
    "soc0@47.5C gpu@48.25C tj@48.375C soc1@47.625C "
    "VDD_IN 4742mW/4742mW VDD_CPU_GPU_CV 475mW/475mW VDD_SOC 1503mW/1503mW"
)


def test_nano_jetpack4():
    s = parse_tegrastats_line(NANO)
    assert s.timestamp is None
    assert (s.ram_used_bytes, s.ram_total_bytes) == (2268 * MIB, 3964 * MIB)
    assert (s.lfb_blocks, s.lfb_block_bytes) == (121, 4 * MIB)
    assert (s.swap_used_bytes, s.swap_total_bytes, s.swap_cached_bytes) == (0, 1982 * MIB, 0)
    assert s.cpu == (CpuCore(17, 1479), CpuCore(6, 1479), CpuCore(11, 1479), CpuCore(7, 1479))
    assert s.cpu_load_mean_pct == pytest.approx((17 + 6 + 11 + 7) / 4)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (4, 1600)
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.gpu_freqs_mhz) == (0, 921, (921,))
    assert s.temperatures_c == {
        "PLL": 34.0,
        "CPU": 36.5,
        "PMIC": 100.0,
        "GPU": 35.5,
        "AO": 44.0,
        "thermal": 35.75,
    }
    assert s.rails == {
        "POM_5V_IN": PowerRail("POM_5V_IN", 2473, 2473),
        "POM_5V_GPU": PowerRail("POM_5V_GPU", 0, 0),
        "POM_5V_CPU": PowerRail("POM_5V_CPU", 498, 498),
    }  # IRAM is memory, not a rail
    assert (s.total_power_mw, s.total_source) == (2473, "POM_5V_IN")


def test_tx2_offline_cores_and_input_rail_not_first():
    s = parse_tegrastats_line(TX2)
    assert s.cpu == (CpuCore(2, 345), None, None, CpuCore(0, 345), CpuCore(1, 345), CpuCore(1, 345))
    assert s.cpu_load_mean_pct == pytest.approx(1.0)
    assert list(s.rails) == [
        "VDD_SYS_GPU",
        "VDD_SYS_SOC",
        "VDD_4V0_WIFI",
        "VDD_IN",
        "VDD_SYS_CPU",
        "VDD_SYS_DDR",
    ]
    assert (s.total_power_mw, s.total_source) == (1829, "VDD_IN")
    assert s.temperatures_c["Tdiode"] == 32.5 and s.temperatures_c["MCPU"] == 35.0


def test_xavier_nx_jetpack5_mw_suffix():
    s = parse_tegrastats_line(XAVIER_NX)
    assert (s.ram_used_bytes, s.ram_total_bytes) == (2004 * MIB, 6854 * MIB)
    assert len(s.cpu) == 6 and s.cpu[4] is None and s.cpu[5] is None
    assert s.rails["VDD_IN"] == PowerRail("VDD_IN", 3832, 3832)
    assert s.rails["VDD_CPU_GPU_CV"] == PowerRail("VDD_CPU_GPU_CV", 460, 460)
    assert s.rails["VDD_SOC"] == PowerRail("VDD_SOC", 1226, 1226)
    assert s.total_power_mw == 3832
    assert s.temperatures_c["AUX"] == 32.5 and s.temperatures_c["thermal"] == 33.05


def test_xavier_nx_without_root_hides_clocks():
    s = parse_tegrastats_line(XAVIER_NX_NOROOT)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (0, None)
    assert (s.gpu_load_pct, s.gpu_freq_mhz, s.gpu_freqs_mhz) == (0, None, ())
    assert s.total_power_mw == 3958
    assert s.rails["VDD_SOC"].average_mw == 1183


def test_agx_orin_sum_of_rails_gpcs_and_offline_sensors():
    s = parse_tegrastats_line(AGX_ORIN)
    assert (s.ram_used_bytes, s.ram_total_bytes) == (18233 * MIB, 30536 * MIB)
    assert len(s.cpu) == 12 and s.cpu[8:] == (None,) * 4
    assert s.cpu_load_mean_pct == pytest.approx((12 + 8 + 100 + 5 + 3 + 0 + 1 + 2) / 8)
    assert (s.emc_load_pct, s.emc_freq_mhz) == (41, 3199)
    assert (s.gpu_load_pct, s.gpu_freqs_mhz, s.gpu_freq_mhz) == (97, (1300, 1300), 1300)
    # CV0/CV1/CV2 at -256C are switched off and left out
    assert set(s.temperatures_c) == {"CPU", "Tboard", "SOC2", "Tdiode", "SOC0", "GPU", "tj", "SOC1"}
    assert s.temperatures_c["CPU"] == 51.593
    assert s.rails["VDD_GPU_SOC"] == PowerRail("VDD_GPU_SOC", 14391, 12874)
    assert s.input_rail is None
    assert s.total_power_mw == 14391 + 2793 + 5447 + 1910
    assert s.total_source == "sum of rails"


def test_orin_nano_jetpack6_timestamp_and_lowercase_sensors():
    s = parse_tegrastats_line(ORIN_NANO_JP6 + "\n")
    assert s.timestamp == datetime(2026, 11, 22, 10, 0, 0)
    assert (s.ram_used_bytes, s.ram_total_bytes) == (2359 * MIB, 7620 * MIB)
    assert (s.lfb_blocks, s.lfb_block_bytes) == (2, 4 * MIB)
    assert s.cpu == tuple(CpuCore(x, 729) for x in (2, 1, 0, 0, 0, 0))
    assert (s.gpu_load_pct, s.gpu_freq_mhz) == (0, 305)
    assert s.temperatures_c == {
        "cpu": 48.375,
        "soc2": 47.281,
        "soc0": 47.5,
        "gpu": 48.25,
        "tj": 48.375,
        "soc1": 47.625,
    }
    assert list(s.rails) == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert (s.total_power_mw, s.total_source) == (4742, "VDD_IN")
    d = s.to_dict()
    assert d["timestamp"] == "2026-11-22T10:00:00" and d["rails_mw"]["VDD_SOC"] == [1503, 1503]


@pytest.mark.parametrize("line", ["", "hello world", "Traceback (most recent call last):"])
def test_non_tegrastats_lines_are_rejected(line):
    with pytest.raises(TegrastatsParseError):
        parse_tegrastats_line(line)


def test_summary_by_hand():
    a = parse_tegrastats_line(XAVIER_NX)  # VDD_IN 3832 mW, RAM 2004 MB
    b = parse_tegrastats_line(XAVIER_NX_NOROOT)  # VDD_IN 3958 mW, RAM 2364 MB
    c = TegraSample(ram_used_bytes=2100 * MIB, rails={"VDD_IN": PowerRail("VDD_IN", 5000, 4000)})
    s = summarize_samples([(100.0, a), (100.5, b), (101.5, c)], "tegrastats", 500)
    assert s.samples == 3 and s.seconds == pytest.approx(1.5)
    assert s.power_mean_mw == pytest.approx((3832 + 3958 + 5000) / 3)
    assert s.power_peak_mw == 5000 and s.power_source == "VDD_IN"
    # trapezoids: 0.5 s at (3832+3958)/2 mW + 1.0 s at (3958+5000)/2 mW
    assert s.energy_j == pytest.approx((0.5 * 3895 + 1.0 * 4479) / 1000, abs=1e-4)
    assert s.ram_used_peak_bytes == 2364 * MIB
    assert s.ram_used_rise_bytes == (2364 - 2004) * MIB
    assert s.ram_used_mean_bytes == pytest.approx((2004 + 2364 + 2100) / 3 * MIB)
    assert s.rails_peak_mw["VDD_SOC"] == 1226 and s.rails_mean_mw["VDD_IN"] == s.power_mean_mw
    assert s.temperature_peak_c["PMIC"] == 100.0
    assert summarize_samples([]) is None


def test_sampler_absent_gives_none_and_a_reason(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with TegraSampler(interval_ms=100, use_jtop=False) as ts:
        pass
    assert not ts.available
    assert ts.summary() is None
    assert "tegrastats" in ts.reason and "PATH" in ts.reason
    assert TegraSampler.probe(use_jtop=False)[0] is None
    with pytest.raises(ValueError):
        TegraSampler(interval_ms=0)


def test_sampler_reads_a_tegrastats_process(tmp_path, monkeypatch):
    """A stand-in tegrastats replays recorded lines; the sampler parses and aggregates them."""
    script = tmp_path / "tegrastats"
    script.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "--interval" ] || exit 2\n'
        f"echo '{ORIN_NANO_JP6}'\n"
        "echo 'garbage'\n"
        "while true; do\n"
        f"  echo '{ORIN_NANO_JP6.replace('VDD_IN 4742mW', 'VDD_IN 6000mW')}'\n"
        "  sleep 0.02\n"
        "done\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    ts = TegraSampler(interval_ms=20, use_jtop=False).start()
    try:
        deadline = time.time() + 20
        while len(ts.samples()) < 3 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        summary = ts.stop()
    assert ts.source == "tegrastats" and ts.bad_lines == 1
    assert summary is not None and summary.samples >= 3
    assert summary.power_peak_mw == 6000 and summary.power_source == "VDD_IN"
    assert 4742 < summary.power_mean_mw <= 6000
    assert summary.ram_used_peak_bytes == 2359 * MIB
    assert ts.summary(since=time.time() + 60) is None  # an empty window


def test_jtop_sample_mapping():
    jetson = SimpleNamespace(
        power={
            "rail": {"VDD_CPU_GPU_CV": {"power": 475, "avg": 470}},
            "tot": {"power": 4742, "avg": 4700, "name": "VDD_IN"},
        },
        memory={"RAM": {"tot": 7620 * 1024, "used": 2359 * 1024}},
    )
    s = _sample_from_jtop(jetson)
    assert s.ram_used_bytes == 2359 * MIB and s.ram_total_bytes == 7620 * MIB
    assert (s.total_power_mw, s.total_source) == (4742, "VDD_IN")
    assert _sample_from_jtop(SimpleNamespace(power={}, memory={})) is None
