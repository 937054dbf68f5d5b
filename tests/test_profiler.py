"""``cotune profile`` (edge_sdk.profiler.profile_cli) end to end on the tiny Llama: a real
training job and a real generation job, each in its fresh subprocess, against the planner."""

from __future__ import annotations

import json
import math

import pytest

from edge_sdk.profiler import EXIT_DOES_NOT_FIT, EXIT_USAGE, profile_cli
from tests.tiny_models import LLAMA_7B_CONFIG

LLAMA_7B = LLAMA_7B_CONFIG
COMMON = ["--device", "generic-cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def train_report(tiny_llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile-train")
    argv = COMMON + [
        "--model",
        str(tiny_llama_path),
        "--job",
        "train",
        "--steps",
        "2",
        "--batch",
        "2",
        "--seq",
        "32",
        "--quant",
        "fp32",
        "--out",
        str(out),
    ]
    rc = profile_cli(argv)
    assert rc == 0
    return out, json.loads((out / "profile.json").read_text())


def test_train_report_has_measured_and_planned_peaks(train_report):
    out, rep = train_report
    assert (
        rep["status"] == "ok" and rep["job"] == "train" and rep["device_profile"] == "generic-cpu"
    )
    m, p, c = rep["measured"], rep["planned"], rep["comparison"]
    assert m["steps"] == 2 and m["tokens_per_step"] == 2 * 32
    assert m["tokens"] == 2 * 2 * 31  # loss tokens: rows x (seq - 1) x steps
    assert m["tokens_per_s"] > 0 and len(m["step_seconds"]) == 2
    assert m["seconds_per_step"] > 0 and m["quant"] == "fp32"
    assert m["peak_source"] in ("VmHWM", "sampled RSS")
    assert m["job_peak_rss_bytes"] >= m["after_load_rss_bytes"] > m["baseline_bytes"] > 0
    assert p["total_bytes"] == sum(p["breakdown"].values()) and p["fits"]
    assert p["workload"]["quant"] == "fp32" and p["workload"]["batch_size"] == 2
    assert c["measured_bytes"] == m["job_peak_rss_bytes"] and c["planned_bytes"] == p["total_bytes"]
    # a process that trains a tiny model is within a factor of two of the plan either way
    for ratio in (c["ratio"], c["job_only"]["ratio"]):
        assert math.isfinite(ratio) and 0.5 < ratio < 2.0
    assert rep["power"] is None or rep["power"]["samples"] > 0
    if rep["power"] is None:
        assert rep["power_unavailable_reason"]
    assert rep["round"] is None


def test_train_writes_the_plot(train_report):
    out, _ = train_report
    png = out / "profile.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_job(tiny_llama_path, tmp_path, capsys):
    out = tmp_path / "gen"
    argv = COMMON + [
        "--model",
        str(tiny_llama_path),
        "--job",
        "generate",
        "--max-new-tokens",
        "4",
        "--prompt",
        "the cat",
        "--out",
        str(out),
        "--export-dir",
        str(tmp_path / "onnx"),
    ]
    assert profile_cli(argv) == 0
    rep = json.loads((out / "profile.json").read_text())
    m = rep["measured"]
    assert m["new_tokens"] == 4 and m["tokens_per_s"] > 0 and m["prompt_tokens"] >= 1
    assert m["backend"] in ("ort", "torch")
    assert rep["planned"]["workload"]["mode"] == "infer"
    assert rep["planned"]["workload"]["seq_len"] == m["prompt_tokens"] + 4
    assert math.isfinite(rep["comparison"]["ratio"])
    assert "tokens/s" in capsys.readouterr().out


def test_refuses_a_job_the_plan_says_does_not_fit(tmp_path, capsys):
    model = tmp_path / "llama-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_7B))  # no weights: never loaded
    out = tmp_path / "out"
    argv = [
        "--device",
        "jetson-nano-4gb",
        "--model",
        str(model),
        "--quant",
        "fp16",
        "--out",
        str(out),
    ]
    assert profile_cli(argv) == EXIT_DOES_NOT_FIT
    err = capsys.readouterr().err
    assert "does not fit" in err and "short by" in err
    rep = json.loads((out / "profile.json").read_text())
    assert rep["status"] == "does_not_fit" and rep["short_by_bytes"] > 0
    assert rep["planned"]["total_bytes"] > rep["planned"]["available_bytes"]
    assert not (out / "profile.png").exists()


@pytest.mark.parametrize(
    "extra",
    [
        ["--device", "no-such-device"],
        ["--data", "zoo:no-such-domain"],
        ["--data", "/nonexistent/texts.txt"],
        ["--steps", "0"],
        ["--round", "--full"],
        ["--bogus-flag"],
    ],
)
def test_usage_errors(tiny_llama_path, tmp_path, extra):
    argv = ["--device", "generic-cpu", "--model", str(tiny_llama_path), "--out", str(tmp_path)]
    assert profile_cli(argv + extra) == EXIT_USAGE
    assert not (tmp_path / "profile.json").exists()


@pytest.mark.slow
def test_round_reports_bytes_per_round(tiny_llama_path, tmp_path):
    out = tmp_path / "round"
    argv = COMMON + [
        "--model",
        str(tiny_llama_path),
        "--steps",
        "1",
        "--batch",
        "2",
        "--seq",
        "32",
        "--quant",
        "fp32",
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj",
        "--round",
        "--out",
        str(out),
    ]
    assert profile_cli(argv) == 0
    rnd = json.loads((out / "profile.json").read_text())["round"]
    assert [r["round"] for r in rnd["rounds"]] == [1, 2]
    adapter_fp16 = rnd["adapter_fp16_bytes"]
    assert adapter_fp16 > 0
    for r in rnd["rounds"]:  # the fp16 adapter goes each way, plus envelopes and control
        assert r["bytes_down"] > adapter_fp16 and r["bytes_up"] > adapter_fp16
    assert rnd["steady"] == rnd["rounds"][-1]


def test_plot_is_skipped_with_a_message_without_matplotlib(train_report, tmp_path, monkeypatch):
    import sys

    from edge_sdk.profiler import _plot

    _, rep = train_report
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    why = _plot(rep, tmp_path / "profile.png")
    assert "matplotlib" in why and not (tmp_path / "profile.png").exists()
