"""edge_sdk.fit: a device's go / no-go on a task, from the planner (config.json only)."""

from __future__ import annotations

import json

import pytest

from edge_sdk.fit import (
    DEFAULT_SEQ_LEN,
    check_task_fits,
    choose_defaults,
    effective_quant,
    workload_for_task,
)
from firmware_profiles import (
    DEFAULT_APP_RESERVE_BYTES,
    DoesNotFit,
    UnknownProfileError,
    Workload,
    WorkloadError,
    fmt_bytes,
    get_profile,
    plan,
)
from tests.tiny_models import LLAMA_7B_CONFIG

LLAMA_7B = LLAMA_7B_CONFIG
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
TRAIN = {"lr": 2e-3, "batch_size": 8, "block_size": 64, "max_steps": 40}


@pytest.fixture
def llama7b_dir(tmp_path):
    d = tmp_path / "llama-7b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_7B))
    return d


def test_tiny_model_fits_agx_orin(tiny_llama_path):
    d = check_task_fits("agx-orin-32gb", tiny_llama_path, LORA, TRAIN, "nf4", False)
    assert d.fits and d.headroom_bytes > 0
    assert d.planned_bytes == sum(d.breakdown.values())
    assert d.budget_bytes == get_profile("agx-orin-32gb").available_bytes(DEFAULT_APP_RESERVE_BYTES)
    assert d.message.startswith("fits:") and fmt_bytes(d.planned_bytes) in d.message
    # the same numbers as asking the planner directly
    w = Workload(
        quant="nf4", lora_rank=8, batch_size=8, seq_len=64, lora_targets=("q_proj", "v_proj")
    )
    assert d.planned_bytes == plan(tiny_llama_path, "agx-orin-32gb", w).total_bytes
    assert d.workload["lora_targets"] == ["q_proj", "v_proj"]
    assert d.to_dict()["fits"] is True


def test_7b_does_not_fit_nano_and_says_by_how_much(llama7b_dir):
    d = check_task_fits("jetson-nano-4gb", llama7b_dir, LORA, TRAIN, "nf4", True)
    assert not d.fits and d.planned_bytes > d.budget_bytes
    assert d.message.startswith("does not fit:")
    for number in (d.planned_bytes, d.budget_bytes):
        assert str(number) in d.message and fmt_bytes(number) in d.message
    assert fmt_bytes(d.planned_bytes - d.budget_bytes) in d.message  # short by
    # no usable bitsandbytes on the Nano: the loader would fall back, and the plan follows it
    assert d.workload["quant"] == "fp32" and d.workload["gradient_checkpointing"] is True
    assert any("bitsandbytes" in n for n in d.notes)


def test_weights_dominate_7b_and_config_dict_accepted():
    d = check_task_fits("orin-nano-8gb", LLAMA_7B, LORA, TRAIN, "nf4", True)
    # 6.5e9 linear params at ~0.53 B each (nf4 + double-quantized scales) > 3 GiB
    assert d.breakdown["weights"] > 3 * (1 << 30)
    assert max(d.breakdown, key=d.breakdown.get) == "weights"


def test_safety_margin_can_turn_the_verdict(tiny_llama_path):
    prof = get_profile("agx-orin-32gb")
    exact = check_task_fits(prof, tiny_llama_path, LORA, TRAIN, "nf4")
    reserve = prof.available_bytes(0) - exact.planned_bytes - 1  # 1 byte of headroom
    tight = check_task_fits(prof, tiny_llama_path, LORA, TRAIN, "nf4", app_reserve_bytes=reserve)
    assert tight.fits and tight.headroom_bytes == 1
    margin = check_task_fits(
        prof, tiny_llama_path, LORA, TRAIN, "nf4", app_reserve_bytes=reserve, safety_margin=0.05
    )
    assert not margin.fits and "safety margin" in margin.message


def test_workload_for_task_defaults():
    w = workload_for_task({"r": 4}, {"batch_size": 2}, "fp32")
    assert (w.lora_rank, w.batch_size, w.seq_len, w.optimizer) == (4, 2, DEFAULT_SEQ_LEN, "adamw")
    assert w.lora_targets is None and not w.gradient_checkpointing
    w = workload_for_task(None, {"block_size": 32, "gradient_checkpointing": True}, "bf16")
    assert w.lora_rank is None and w.seq_len == 32 and w.gradient_checkpointing
    assert effective_quant(get_profile("orin-nano-8gb"), "nf4") == ("nf4", None)
    # Volta has no bf16: the loader's fallback is fp32, as load_causal_lm does
    q, note = effective_quant(get_profile("xavier-nx-8gb"), "int8")
    assert q == "fp32" and "bitsandbytes" in note


def test_choose_defaults(tiny_llama_path, llama7b_dir):
    rec = choose_defaults("agx-orin-32gb", tiny_llama_path)
    assert set(rec) >= {
        "quant",
        "batch_size",
        "block_size",
        "gradient_checkpointing",
        "lora_rank",
        "planned_bytes",
        "budget_bytes",
    }
    assert rec["planned_bytes"] <= rec["budget_bytes"]
    d = check_task_fits(
        "agx-orin-32gb",
        tiny_llama_path,
        {"r": rec["lora_rank"]},
        {"batch_size": rec["batch_size"], "block_size": rec["block_size"]},
        rec["quant"],
        rec["gradient_checkpointing"],
    )
    assert d.fits and d.planned_bytes == rec["planned_bytes"]
    with pytest.raises(DoesNotFit):
        choose_defaults("jetson-nano-4gb", llama7b_dir)


def test_unknown_profile_is_typed(tiny_llama_path):
    with pytest.raises(UnknownProfileError):
        check_task_fits("orin-nanoo", tiny_llama_path, LORA, TRAIN, "nf4")


def test_edge_client_refuses_a_task_that_cannot_fit_before_downloading(make_federation, tmp_path, llama7b_dir):
    """A 7B config on a Jetson Nano: the client answers the Task with a typed ErrorReport
    ("does_not_fit", with the numbers) and trains nothing; a task that fits is not refused."""
    from bridge.messages import ErrorReport, Task
    from edge_sdk.client import EdgeClient

    big = llama7b_dir
    paths = make_federation("fitfed", ["dev1"])
    client = EdgeClient(paths.party_config("dev1"), big, ["text"], profile="jetson-nano-4gb", quant="fp16",
                        work_dir=tmp_path / "w", progress=None)
    sent = []
    client.endpoint.send = lambda to, msg, round=None: sent.append((to, msg))
    client._download = lambda *a, **k: (_ for _ in ()).throw(AssertionError("downloaded despite refusal"))
    task = Task(round=1, algorithm="fedavg", config={"lora": {"r": 8}, "train": {"batch_size": 4, "block_size": 512}})
    client.handle_task(task, "aggregator")
    assert len(sent) == 1 and isinstance(sent[0][1], ErrorReport)
    assert sent[0][1].code == "does_not_fit" and "GiB" in sent[0][1].detail
    assert client.history[-1]["error"] == "does_not_fit"
    assert client._does_not_fit(Task(round=1, algorithm="fedbiot", config=task.config)) is None  # trains the emulator


def test_edge_client_turns_on_checkpointing_when_that_is_what_makes_the_task_fit(make_federation, tmp_path,
                                                                                 llama7b_dir):
    """A task that fits the device only with activation checkpointing is not refused: the
    client turns checkpointing on (its own device default) and trains."""
    from bridge.messages import Task
    from edge_sdk.client import EdgeClient

    paths = make_federation("fitfed2", ["dev1"])
    lora, quant = {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "nf4"
    found = None
    for block in (256, 512, 1024, 2048, 4096):
        train = {"batch_size": 8, "block_size": block}
        plain = check_task_fits("agx-orin-32gb", llama7b_dir, lora, train, quant, False)
        ckpt = check_task_fits("agx-orin-32gb", llama7b_dir, lora, train, quant, True)
        if not plain.fits and ckpt.fits:
            found = train
            break
    assert found is not None, "no configuration separates checkpointing from not on this profile"
    client = EdgeClient(paths.party_config("dev1"), llama7b_dir, ["text"], profile="agx-orin-32gb", quant=quant,
                        work_dir=tmp_path / "w", progress=None)
    assert client.ctx.gradient_checkpointing is False
    dp_train = {**found, "dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    refusal = client._does_not_fit(Task(round=1, algorithm="fedavg", config={"lora": lora, "train": dp_train}))
    assert refusal is not None and "DP-SGD" in refusal  # checkpointing cannot rescue a DP-SGD task
    assert client.ctx.gradient_checkpointing is False
    assert client._does_not_fit(Task(round=1, algorithm="fedavg", config={"lora": lora, "train": found})) is None
    assert client.ctx.gradient_checkpointing is True


def test_per_architecture_targets_and_the_lm_head(tiny_llama_path, tiny_gpt2_path):
    """A mixed fleet's task: each model plans with its own entry of the target mapping; LoRA
    on the LM head adds one r x (hidden + vocab) adapter (not one per layer)."""
    cfg = json.loads((tiny_llama_path / "config.json").read_text())
    base = ["q_proj", "v_proj"]
    mixed = {"r": 4, "target_modules": {"llama": base + ["lm_head"], "gpt2": None}}
    with_head = check_task_fits("agx-orin-32gb", tiny_llama_path, mixed, TRAIN, "fp32")
    without = check_task_fits("agx-orin-32gb", tiny_llama_path, {"r": 4, "target_modules": base}, TRAIN, "fp32")
    assert with_head.workload["lora_targets"] == base + ["lm_head"]
    head = 4 * (cfg["hidden_size"] + cfg["vocab_size"]) * 4  # fp32 A and B
    assert with_head.breakdown["lora"] - without.breakdown["lora"] == head
    gpt2 = check_task_fits("agx-orin-32gb", tiny_gpt2_path, mixed, TRAIN, "fp32")
    assert gpt2.workload["lora_targets"] is None  # null: the architecture's defaults
    with pytest.raises(WorkloadError, match="'gpt2'"):
        check_task_fits("agx-orin-32gb", tiny_gpt2_path, {"target_modules": {"llama": base}}, TRAIN, "fp32")
