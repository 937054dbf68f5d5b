"""FedMKT figures of ``bench/quality.py --algorithm fedmkt`` (kept apart from the other algorithms).

Setup: heterogeneous clients. One client per domain, the domains alternating between the zoo's
Llama SLM (tokenizer t1, the LLM's) and its GPT-2 SLM (tokenizer t2, different marker style and
vocabulary), each holding its domain's private split. D_p = the public slices of the domains.
The client SLMs carry LoRA on their architecture's default targets (one config must fit both
families); the LLM's LoRA is the one of the centralized baseline. Baselines computed here:
"standalone" = each client alone (FedAvg with one client) with the same SLM, LoRA, rounds and
steps. The LLM baselines (zero-shot, centralized) are ``bench/quality.py``'s.

Figures:
- ``slm_vs_standalone``: mean over clients of ppl(client SLM after FedMKT) / ppl(standalone)
  on its own domain's test split (< 1: FedMKT helps); ``slm_vs_standalone_worst_family``: the
  larger of the two families' means; ``slm_vs_standalone_by_family``.
- ``llm_gap_closed`` = (nll_base - nll_fedmkt) / (nll_base - nll_centralized) for the LLM, mean
  test NLL over the domains. The FedMKT LLM never sees private data: only D_p and the clients'
  aligned top-k logits on it.
"""

from __future__ import annotations

import tempfile

#: the client SLMs' LoRA: architecture defaults (q/k/v/o + MLP for Llama, c_attn/c_proj/c_fc
#: for GPT-2), since one Task config reaches both families
SLM_LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
FAMILIES = ("slm-llama", "slm-gpt2")


def settings(bench) -> dict:
    """The LLM trains 60 (quick) / 120 steps per round on D_p at lr 2e-3, the clients distil 20 /
    40 steps at 1e-3 before their usual task steps (chosen on the dev split, quick setting)."""
    quick = bench.args.quick
    s = bench.s
    steps = 20 if quick else 40
    return {
        "lora": SLM_LORA,
        "train": s["fedavg"]["train"],
        "eval_block_size": 64,
        "k": 16,
        # chosen on dev (quick, 3 rounds, LLM dev gap closed after the last round): with the
        # LLM's own rows kept as targets (keep_own "self") and 60 LLM steps, 0.2 (0.363) beat
        # 0.5 (0.247); "self" beat "task" at 0.2 (0.363 vs 0.335 after round 2); the paper's
        # 0.9 with its renormalised top-k gave less, and 0.5 without the tail bucket made the
        # LLM worse than its base
        "lambda_task": 0.2,
        "keep_own": "self",
        "kd_tail": True,
        # the Llama family shares the LLM's tokenizer: its base is aligned to the LLM on D_p
        # (the GPT-2 family keeps its own; see FedMKTConfig.align_base)
        "align_base": {} if not getattr(bench.args, "no_align", False) else None,
        "temperature": 1.0,
        "mode": "mutual",
        "public_max_samples": None,
        "public_max_chars": 512,
        "public_block_size": 64,
        "kd_train": {"lr": 1e-3, "epochs": 100, "batch_size": 8, "max_steps": steps},
        "llm_lora": s["fedavg"]["lora"],
        # 60 steps per round (20 before keep_own "self": the task term alone overfits D_p)
        "llm_train": {"lr": 2e-3, "epochs": 100, "batch_size": 8, "max_steps": 3 * steps, "warmup": 2},
    }


def family_of(bench, domain: str) -> str:
    return FAMILIES[bench.domains.index(domain) % len(FAMILIES)]


def _clients(bench, names):
    from edge_sdk.context import DeviceContext

    return [
        DeviceContext(
            d, str(bench.zoo[family_of(bench, d)]), bench.private[d], bench.test[d], progress=None
        )
        for d in names
    ]


def _server_ctx(bench, llm=None, slm: str | None = None):
    """FedMKT's (both families as "slm" / "slm:gpt2"), or a standalone client's (its ``slm``)."""
    from aggregator.context import ServerContext

    work = tempfile.mkdtemp(prefix="cotune-bench-fedmkt-")
    if slm is not None:
        models = {"slm": str(bench.zoo[slm]), "llm": bench.llm_path}
    else:
        models = {
            "slm": str(bench.zoo["slm-llama"]),
            "slm:gpt2": str(bench.zoo["slm-gpt2"]),
            "llm": bench.llm_path,
        }
    return ServerContext(work, 0, models, bench.public, {"backend": "local"}, llm_backend=llm)


def run(bench) -> None:
    from aggregator.llm import LocalLLM
    from cotune.simulate import simulate

    cfg = settings(bench)
    bench.results["fedmkt_settings"] = cfg
    bench.results["fedmkt_families"] = {d: family_of(bench, d) for d in bench.domains}
    standalone_cfg = {"lora": SLM_LORA, "train": cfg["train"], "eval_block_size": 64}
    out = {}
    for d in bench.domains:
        res = simulate(
            "fedavg",
            standalone_cfg,
            _server_ctx(bench, slm=family_of(bench, d)),
            _clients(bench, [d]),
            bench.s["rounds"],
            progress=None,
        )
        out.update(bench._final_slm(res))
    bench.results["slm_standalone_fedmkt"] = out
    bench.say(f"standalone SLMs (FedMKT's families and LoRA): mean test NLL {bench.mean(out):.4f}")

    llm = LocalLLM(bench.llm_path)
    curve = []

    def after(r, state, server):
        m = server.llm_with(state)
        curve.append(bench.mean(bench.eval_domains(m, llm.tokenizer(), "dev")))
        bench.say(f"fedmkt round {r}: LLM dev NLL {curve[-1]:.4f}")

    res = simulate(
        "fedmkt",
        cfg,
        _server_ctx(bench, llm),
        _clients(bench, bench.domains),
        bench.s["rounds"],
        progress=None,
        after_round=after,
    )
    bench.results["slm_fedmkt"] = bench._final_slm(res)
    bench.results["llm_fedmkt"] = bench.eval_domains(
        res.server.llm_with(res.state), llm.tokenizer()
    )
    bench.results["llm_fedmkt_dev_curve"] = curve
    bench.results["fedmkt_rounds"] = [
        {
            "server": {k: v for k, v in r.server.items() if k != "llm_train"},
            "clients": {
                c: {k: v for k, v in m.items() if k != "train"} for c, m in r.clients.items()
            },
        }
        for r in res.rounds
    ]
    bench.say(
        f"FedMKT: LLM test NLL {bench.mean(bench.results['llm_fedmkt']):.4f}, "
        f"SLM {bench.mean(bench.results['slm_fedmkt']):.4f}"
    )


def figures(bench) -> dict:
    r, m = bench.results, bench.mean
    ratios = {
        d: r["slm_fedmkt"][d]["ppl"] / r["slm_standalone_fedmkt"][d]["ppl"] for d in bench.domains
    }
    by_family = {}
    for fam in FAMILIES:
        vals = [v for d, v in ratios.items() if family_of(bench, d) == fam]
        if vals:
            by_family[fam] = round(sum(vals) / len(vals), 4)
    gap = m(r["llm_zero_shot"]) - m(r["llm_centralized"])
    return {
        "slm_vs_standalone": round(sum(ratios.values()) / len(ratios), 4),
        "slm_vs_standalone_worst_family": max(by_family.values()),
        "slm_vs_standalone_by_family": by_family,
        "llm_gap_closed": round((m(r["llm_zero_shot"]) - m(r["llm_fedmkt"])) / gap, 4),
        "nll_llm": round(m(r["llm_fedmkt"]), 4),
        "nll_slm": round(m(r["slm_fedmkt"]), 4),
        "nll_slm_standalone_same_families": round(m(r["slm_standalone_fedmkt"]), 4),
        "acc_llm": round(m(r["llm_fedmkt"], "acc"), 4),
    }
