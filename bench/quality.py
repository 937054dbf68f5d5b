"""Quality of the knowledge transfer, every baseline computed in the same run.

Setup: the zoo's LLM (6.7M) and Llama SLM (1.4M) share tokenizer t1. One client per bundled
text domain (non-IID); each holds its domain's private split. The aggregator's public set D_a
is the public slice of every client domain. Metric: mean held-out token NLL per domain (test
split), averaged over the domains; perplexity and next-token accuracy beside it. Dev splits
choose alpha (FedPT) and early stopping of the centralized baseline; the test split is touched
only for the reported figures.

Baselines: zero-shot; standalone (each client alone: FedAvg with one client, the same rounds
and steps); FedAvg (all clients); centralized (LoRA on the union of all private data plus
D_a, best dev checkpoint; for FedPT this is "the directly tuned LLM").

Figures (last line ``BENCH quality {...}``):
- fedcollm: ``llm_gap_closed`` = (nll_base - nll_fedcollm) / (nll_base - nll_centralized) for
  the LLM; ``slm_vs_standalone``, ``slm_vs_fedavg`` = mean over clients of the client's SLM
  perplexity under FedCoLLM / under the baseline (< 1 is better).
- fedpt: ``proxy_gap_closed`` = (nll_LLM_base - nll_proxy) / (nll_LLM_base - nll_LLM_tuned) at
  the alpha chosen on dev; ``slm_vs_standalone``/``slm_vs_fedavg`` for its distilled SLM.
- fedbiot: against its own baseline FedOT, see ``bench/fedbiot_quality.py``
  (``adapter_full_vs_fedot``, ``adapter_emulator_vs_fedot``, ``client_memory_ratio``,
  ``download_ratio``); alone, it skips the SLM and centralized baselines above.
- fedmkt: heterogeneous clients (Llama / GPT-2 SLMs by domain), see ``bench/fedmkt_quality.py``:
  ``llm_gap_closed`` as for fedcollm; ``slm_vs_standalone`` (mean, and worst family) against
  standalone clients of the same families.
- fedavg ``--async``: synchronous FedAvg against buffered asynchronous FedAvg (FedBuff: every
  K accepted updates make a version, each update weighted by its staleness) on the same
  clients, each with a seeded simulated speed (lognormal spread, one straggler in four, 4x
  slower; ``cotune.simulate.ClientTiming``). Both are held to the same number of client
  updates (rounds x clients) and FedBuff also to the synchronous run's simulated wall time.
  Figures: the SLM's mean test NLL of the global after each, ``async_vs_sync`` (NLL ratio at
  equal updates; ``..._same_time`` at equal simulated time), ``gain_retained`` = (nll_base -
  nll_async) / (nll_base - nll_sync), simulated seconds of both, and ``time_to_sync_nll``: the
  simulated time FedBuff needs to reach the synchronous final NLL, over the synchronous time.

    python bench/quality.py --algorithm fedcollm,fedpt --quick
    python bench/quality.py --algorithm fedbiot --quick
    python bench/quality.py --algorithm fedmkt --quick

Side by side on one run's baselines (``BENCH`` gains ``variants`` and ``grid``; a second PNG
shows each variant's headline figure):
- ``--papers``: each algorithm at its paper's settings (``PAPER_VARIANTS``: FedCoLLM and
  FedPT on the device's own SLM base, FedPT's server distillation without the task CE,
  FedMKT with the renormalised top-k, KD skipped where no teacher wins, lambda 0.9, no
  aligned base and no held-out judge of the LLM's steps), all at once and one choice at a
  time;
- ``--grid``: the loss weights (FedCoLLM ``lambda_kd``, FedMKT ``lambda``), each value a run;
  the value with the lowest LLM dev NLL after the last round is reported as chosen on dev;
- ``--variant NAME:ALGO.PATH=VALUE[,...]``: any other settings.

    python bench/quality.py --algorithm fedcollm,fedpt,fedmkt --quick --zoo bench --papers --grid
- fedavg ``--dp``: DP-FedAvg (client-level central DP, :mod:`aggregator.dp`) at epsilon 1, 4
  and 8 (delta 1e-5, every client in every round: q = 1, no amplification by sampling) against
  the same non-private FedAvg: the SLM's mean test NLL of each, ``nll_ratio`` to the
  non-private run, the noise multiplier the accountant solved for, and the L2 norm of the
  noise on the mean beside the clip (``noise_norm_over_clip``: the noise dominates until there
  are about that many clients per round). The clip C is the non-private run's round-1 global
  delta norm (``--dp-clip`` overrides; chosen on a non-private run, as DP papers do).

    python bench/quality.py --algorithm fedavg --async --quick
    python bench/quality.py --algorithm fedavg --dp --quick
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUICK_DOMAINS = ["computers", "politics", "science", "songs-poems"]  # the four largest
ALPHAS = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.25, 1.5]


#: LoRA on every linear layer including the LM head, for every model and method alike: the
#: domains differ mostly in word use, and an adapter on the output layer is where a shift of
#: the next-token distribution is cheapest to learn (and to carry from SLM to LLM by proxy)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def settings(quick: bool) -> dict:
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": TARGETS}
    # every method and baseline trains its clients alike; lr 3e-3 and 60 steps per round were
    # chosen on dev for FedCoLLM/FedPT on the aligned base (1e-3 / 30 before it: 0.64 / 0.54)
    train = {"lr": 3e-3, "epochs": 100, "batch_size": 8, "block_size": 64, "max_steps": 60 if quick else 80,
             "warmup": 2}
    distill = {"epochs": 100, "batch_size": 8, "block_size": 64, "lr": 1e-3, "max_steps": 30 if quick else 60,
               "warmup": 5}
    return {
        "rounds": 5 if quick else 8,
        "domains": QUICK_DOMAINS if quick else None,
        "private_limit": 300 if quick else None,
        "eval_limit": 60 if quick else None,
        "fedavg": {"lora": lora, "train": train, "eval_block_size": 64},
        "fedcollm": {"lora": lora, "train": train, "eval_block_size": 64, "llm_lora": lora,
                     "distill": {**distill, "lr_llm": 3e-3, "lambda_kd": 1.0, "task_weight": 1.0,
                                                 "max_steps": 60 if quick else 120},
                     # the paper's choice; --llm-teacher proxy: the LLM learns the SLM's adaptation
                     # through the proxy-tuned LLM (0.70 vs 0.68 at 3 rounds, but it degrades by 5)
                     "llm_teacher": "slm"},
        "fedpt": {"lora": lora, "train": train, "eval_block_size": 64, "alpha": 1.0,
                  "distill": {**distill, "lambda_kd": 1.0, "task_weight": 1.0}},
        "central": {"lrs": [1e-3, 3e-3] if quick else [3e-4, 1e-3, 3e-3], "batch_size": 8, "block_size": 64,
                    "eval_every": 20, "max_steps": 400 if quick else 800, "warmup": 5},
    }


#: the papers' settings beside the adopted ones (``--papers``): one variant with every choice of
#: the paper at once, and one per choice (the others as adopted) to see what each is worth
PAPER_VARIANTS = {
    "fedcollm": {"papers": {"align_base": None}},
    "fedpt": {
        "papers": {"align_base": None, "distill.task_weight": 0.0},
        "no_task_ce": {"distill.task_weight": 0.0},
    },
    "fedmkt": {
        "papers": {"align_base": None, "kd_tail": False, "keep_own": "task", "lambda_task": 0.9,
                   "llm_holdout": 0.0},
        "kd_tail_off": {"kd_tail": False},
        "keep_own_task": {"keep_own": "task"},
    },
}

#: the loss weights chosen on dev (``--grid``): each value a variant, the adopted one included;
#: the choice is the lowest LLM dev NLL after the last round
GRIDS = {
    "fedcollm": ("distill.lambda_kd", [0.5, 1.0, 2.0]),
    "fedmkt": ("lambda_task", [0.2, 0.5, 0.9]),
}


#: the NLL figures a variant keeps (the baselines' are the adopted run's)
FIG_NLL_KEYS = ("nll_llm", "nll_slm", "nll_proxy", "nll_expert_slm", "nll_anti_expert_slm")


def set_path(cfg: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        if not isinstance(cfg.get(k), dict):
            raise SystemExit(f"variant: {path!r}: {k!r} is not a section of the settings")
        cfg = cfg[k]
    cfg[keys[-1]] = value


def get_path(cfg: dict, path: str):
    for k in path.split("."):
        cfg = cfg[k]
    return cfg


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:ALGO.PATH=JSON[,ALGO.PATH=JSON...]`` (a bare word that is not JSON is a string)."""
    name, sep, body = text.partition(":")
    if not sep or not name or not body:
        raise SystemExit(f"--variant {text!r}: expected NAME:ALGO.PATH=VALUE[,...]")
    out: dict = {}
    for item in body.split(","):
        path, eq, raw = item.partition("=")
        algo, dot, rest = path.strip().partition(".")
        if not eq or not dot:
            raise SystemExit(f"--variant {text!r}: {item!r} is not ALGO.PATH=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(algo, {})[rest] = value
    return name, out


class Bench:
    def __init__(self, args):
        import torch

        torch.set_num_threads(args.threads)
        from algorithms.zoo import build_zoo
        from algorithms.zoo.datasets import domain_split, domains

        self.args = args
        self.s = settings(args.quick)
        if args.rounds:
            self.s["rounds"] = args.rounds
        if getattr(args, "no_align", False):
            for algo in ("fedcollm", "fedpt"):
                self.s[algo]["align_base"] = None
        if getattr(args, "llm_teacher", None):
            self.s["fedcollm"]["llm_teacher"] = args.llm_teacher
        from algorithms.zoo.recipes import recipe_named

        self.zoo = build_zoo(recipe=recipe_named(getattr(args, "zoo", "full")), progress=True)
        self.slm_path, self.llm_path = str(self.zoo["slm-llama"]), str(self.zoo["llm"])
        self.domains = self.s["domains"] or domains()
        lim, elim = self.s["private_limit"], self.s["eval_limit"]
        self.private = {d: domain_split(d, "private")[:lim] for d in self.domains}
        self.public = [t for d in self.domains for t in domain_split(d, "public")]
        self.dev = {d: domain_split(d, "dev")[:elim] for d in self.domains}
        self.test = {d: domain_split(d, "test")[:elim] for d in self.domains}
        self.results: dict = {"settings": self.s, "domains": self.domains}
        self.overrides: dict = {}  # algorithm -> {dotted path: value}, set by run_variant
        self.t0 = time.time()

    def cfg(self, algo: str) -> dict:
        """The settings of ``algo`` with the current variant's overrides applied (a deep copy:
        the adopted settings stay as they are)."""
        cfg = json.loads(json.dumps(self.adopted_settings(algo)))
        for path, value in self.overrides.get(algo, {}).items():
            set_path(cfg, path, value)
        return cfg

    def say(self, msg: str) -> None:
        print(f"[quality {time.time() - self.t0:7.1f}s] {msg}", flush=True)

    # -- evaluation -----------------------------------------------------------------------------
    def eval_domains(self, model, tok, split: str = "test") -> dict:
        from algorithms.core.textdata import evaluate_nll

        data = self.test if split == "test" else self.dev
        out = {}
        for d in self.domains:
            r = evaluate_nll(model, tok, data[d], block_size=64, batch_size=16)
            out[d] = {"nll": r.nll, "ppl": r.ppl, "acc": r.accuracy}
        return out

    @staticmethod
    def mean(per_domain: dict, key: str = "nll") -> float:
        return sum(v[key] for v in per_domain.values()) / len(per_domain)

    # -- baselines ------------------------------------------------------------------------------
    def zero_shot(self) -> None:
        from algorithms.core.modeling import load_causal_lm

        for role, path in (("llm", self.llm_path), ("slm", self.slm_path)):
            m, tok, _ = load_causal_lm(path)
            self.results[f"{role}_zero_shot"] = self.eval_domains(m, tok)
            self.say(f"{role} zero-shot: mean test NLL {self.mean(self.results[f'{role}_zero_shot']):.4f}")

    def centralized_llm(self) -> None:
        """LoRA on the union of every client's private data plus D_a. A fair, tuned baseline:
        each learning rate of a small grid trains with dev evaluation every chunk of steps and
        early stopping; the best dev checkpoint over the grid is the centralized model."""
        from algorithms.core.modeling import (
            LoraSpec,
            adapter_state,
            attach_lora,
            load_adapter_state,
            load_causal_lm,
        )
        from algorithms.core.textdata import TokenizedDataset
        from algorithms.core.training import TrainConfig, train_causal_lm

        c = self.s["central"]
        base, tok, _ = load_causal_lm(self.llm_path)
        m = attach_lora(base, LoraSpec.from_dict(self.s["fedavg"]["lora"]), seed=0)
        init = adapter_state(m)
        self.results["llm_zero_shot_dev"] = self.mean(self.eval_domains(m, tok, "dev"))
        union = [t for d in self.domains for t in self.private[d]] + self.public
        ds = TokenizedDataset(tok, union, c["block_size"], seed=0)
        best, best_state, curves = math.inf, None, {}
        for lr in c["lrs"]:
            load_adapter_state(m, init)
            curve: list[float] = []

            def on_progress(p, lr=lr, curve=curve):
                # dev NLL every eval_every steps of ONE optimizer run (a restarted AdamW takes a
                # full-size sign step on every parameter: evaluating by restarting would hurt)
                nonlocal best, best_state
                if p.done or p.step == 0:
                    return False
                dev = self.mean(self.eval_domains(m, tok, "dev"))
                curve.append(dev)
                self.say(f"centralized LLM lr {lr:g}: {p.step} steps, dev NLL {dev:.4f}")
                if dev < best:
                    best, best_state = dev, adapter_state(m)
                return len(curve) >= 4 and dev > min(curve) + 0.01  # early stop

            cfg = TrainConfig(lr=lr, batch_size=c["batch_size"], max_steps=c["max_steps"], epochs=100,
                              schedule="linear", warmup=c["warmup"], log_every=c["eval_every"], seed=0)
            train_causal_lm(m, ds, cfg, progress=on_progress)
            curves[str(lr)] = curve
        load_adapter_state(m, best_state)
        self.results["llm_centralized"] = self.eval_domains(m, tok)
        self.results["llm_centralized_dev"] = best
        self.results["llm_centralized_dev_curves"] = curves
        self.say(f"centralized LLM: best dev NLL {best:.4f} (zero-shot {self.results['llm_zero_shot_dev']:.4f}); "
                 f"test NLL {self.mean(self.results['llm_centralized']):.4f}")

    def _clients(self, names=None):
        from edge_sdk.context import DeviceContext

        names = names or self.domains
        return [DeviceContext(d, self.slm_path, self.private[d], self.test[d], progress=None) for d in names]

    def _server_ctx(self, llm=None):
        from aggregator.context import ServerContext

        return ServerContext("/tmp", 0, {"slm": self.slm_path, "llm": self.llm_path}, self.public, {"backend": "local"},
                             llm_backend=llm)

    def _final_slm(self, res) -> dict:
        return {d: {"nll": m["nll_final"], "ppl": m["ppl_final"], "acc": m["acc_final"]} for d, m in res.final.items()}

    def standalone(self) -> None:
        from cotune.simulate import simulate

        out = {}
        for d in self.domains:
            res = simulate("fedavg", self.s["fedavg"], self._server_ctx(), self._clients([d]), self.s["rounds"],
                           progress=None)
            out.update(self._final_slm(res))
        self.results["slm_standalone"] = out
        self.say(f"standalone SLMs: mean test NLL {self.mean(out):.4f}")

    def fedavg(self) -> None:
        from cotune.simulate import simulate

        res = simulate("fedavg", self.s["fedavg"], self._server_ctx(), self._clients(), self.s["rounds"],
                       progress=None, after_round=lambda r, *_: self.say(f"fedavg round {r} done"))
        self.results["slm_fedavg"] = self._final_slm(res)
        self.say(f"FedAvg SLM: mean test NLL {self.mean(self.results['slm_fedavg']):.4f}")

    # -- the algorithms -------------------------------------------------------------------------
    def fedcollm(self) -> None:
        from aggregator.llm import LocalLLM
        from cotune.simulate import simulate

        llm = LocalLLM(self.llm_path)
        curve = []

        def after(r, state, server):
            m = server.llm_with(state)
            curve.append(self.mean(self.eval_domains(m, llm.tokenizer(), "dev")))
            self.say(f"fedcollm round {r}: LLM dev NLL {curve[-1]:.4f}")

        res = simulate("fedcollm", self.cfg("fedcollm"), self._server_ctx(llm), self._clients(), self.s["rounds"],
                       progress=None, after_round=after)
        self.results["slm_fedcollm"] = self._final_slm(res)
        self.results["llm_fedcollm"] = self.eval_domains(res.server.llm_with(res.state), llm.tokenizer())
        self.results["llm_fedcollm_dev_curve"] = curve
        self.say(f"FedCoLLM: LLM test NLL {self.mean(self.results['llm_fedcollm']):.4f}, "
                 f"SLM {self.mean(self.results['slm_fedcollm']):.4f}")

    def fedpt(self) -> None:
        from aggregator.llm import LocalLLM
        from algorithms.fedpt import evaluate_proxy
        from cotune.simulate import simulate

        llm = LocalLLM(self.llm_path)
        res = simulate("fedpt", self.cfg("fedpt"), self._server_ctx(llm), self._clients(), self.s["rounds"],
                       progress=None, after_round=lambda r, *_: self.say(f"fedpt round {r} done"))
        self.results["slm_fedpt"] = self._final_slm(res)
        expert = res.server.expert_with(res.state)
        tok = llm.tokenizer()
        dev = {d: evaluate_proxy(llm, expert, tok, self.dev[d], ALPHAS, block_size=64) for d in self.domains}
        dev_mean = {a: sum(dev[d][a].nll for d in self.domains) / len(self.domains) for a in ALPHAS}
        alpha = min(ALPHAS, key=lambda a: dev_mean[a])
        test = {d: evaluate_proxy(llm, expert, tok, self.test[d], [alpha], block_size=64)[alpha] for d in self.domains}
        # the proxy against its own parts: the expert SLM alone and the (aligned) anti-expert alone
        self.results["slm_fedpt_expert"] = self.eval_domains(expert, tok)
        self.results["slm_fedpt_anti"] = self.eval_domains(res.server.slm_base()[0], tok)
        self.results["proxy_dev_by_alpha"] = dev_mean
        self.results["proxy_alpha"] = alpha
        self.results["llm_proxy"] = {d: {"nll": r.nll, "ppl": r.ppl, "acc": r.accuracy} for d, r in test.items()}
        self.say(f"FedPT: alpha {alpha} chosen on dev ({', '.join(f'{a}: {v:.3f}' for a, v in dev_mean.items())}); "
                 f"proxy test NLL {self.mean(self.results['llm_proxy']):.4f}")

    # -- synchronous vs buffered asynchronous FedAvg ---------------------------------------------
    def _global_evaluator(self):
        """Mean test NLL (and per domain) of a FedAvg global state on the SLM: one model, the
        state's adapter loaded for each call."""
        from algorithms.core.modeling import (
            LoraSpec,
            attach_lora,
            load_adapter_state,
            load_causal_lm,
        )
        from algorithms.core.state_parts import client_part, to_torch

        base, tok, _ = load_causal_lm(self.slm_path)
        model = attach_lora(base, LoraSpec.from_dict(self.s["fedavg"]["lora"]), seed=0)

        def evaluate(state) -> dict:
            load_adapter_state(model, to_torch(client_part(state)))
            return self.eval_domains(model, tok)

        return evaluate

    def fedavg_async(self) -> None:
        from aggregator.buffered import BufferedConfig
        from cotune.simulate import ClientTiming, simulate, simulate_async

        a = self.args
        n, rounds = len(self.domains), self.s["rounds"]
        timing = ClientTiming(median_seconds=60.0, spread=0.5, stragglers=0.25,
                              straggler_factor=4.0, jitter=0.2, dropout=0.0, seed=a.seed)
        buffered = BufferedConfig(buffer_size=a.buffer_size, concurrency=a.concurrency or n,
                                  max_staleness=a.max_staleness, staleness=a.staleness,
                                  server_lr=a.server_lr)
        evaluate = self._global_evaluator()
        r = self.results
        r["async_settings"] = {"timing": vars(timing), "buffered": buffered.to_dict(),
                               "max_updates": a.async_max_factor * rounds * n}
        base = evaluate(self._initial_fedavg_state())
        r["slm_zero_shot"] = base
        self.say(f"SLM zero-shot (version 0): mean test NLL {self.mean(base):.4f}")

        sync_nll: list[float] = []

        sync_domains: list[dict] = []

        def after_round(rnd, state, server):
            sync_domains.append({d: v["nll"] for d, v in evaluate(state).items()})
            sync_nll.append(sum(sync_domains[-1].values()) / n)
            self.say(f"sync FedAvg round {rnd}: test NLL {sync_nll[-1]:.4f}")

        sync = simulate("fedavg", self.s["fedavg"], self._server_ctx(), self._clients(), rounds,
                        progress=None, after_round=after_round, timing=timing)
        t, curve = 0.0, [{"updates": 0, "sim_time": 0.0, "nll": self.mean(base)}]
        for rec, nll, per in zip(sync.rounds, sync_nll, sync_domains, strict=True):
            t += rec.sim_seconds
            curve.append({"round": rec.round, "updates": rec.round * n, "sim_time": round(t, 2),
                          "nll": nll, "nll_by_domain": per})
        r["sync_curve"], r["sync_sim_seconds"] = curve, t
        r["slm_fedavg"] = self._final_slm(sync)
        r["slm_fedavg_global"] = evaluate(sync.state)

        acurve = [{"version": 0, "updates": 0, "sim_time": 0.0, "nll": self.mean(base)}]

        def after_version(rec, state, server):
            per = {d: v["nll"] for d, v in evaluate(state).items()}
            acurve.append({"version": rec.version, "updates": rec.updates,
                           "sim_time": round(rec.sim_time, 2), "nll": sum(per.values()) / n,
                           "nll_by_domain": per, "clients": rec.clients,
                           "staleness": {str(k): v for k, v in rec.staleness.items()}})
            self.say(f"FedBuff version {rec.version}: {rec.updates} updates at "
                     f"t={rec.sim_time:.0f}s, staleness {rec.staleness}, "
                     f"test NLL {acurve[-1]['nll']:.4f}")

        res = simulate_async("fedavg", self.s["fedavg"], self._server_ctx(), self._clients(),
                             buffered=buffered, updates=rounds * n, sim_seconds=t,
                             max_updates=a.async_max_factor * rounds * n, timing=timing,
                             progress=None, after_version=after_version, apply_final=False)
        r["async_curve"] = acurve
        r["async_run"] = {"accepted": res.accepted, "rejected": res.rejected,
                          "dropped": res.dropped, "unapplied": res.unapplied,
                          "sim_time": res.sim_time,
                          "updates_by_client": {p: len(m) for p, m in res.clients.items()},
                          "speeds": res.speeds, "stragglers": res.stragglers}
        self.say(f"FedBuff: {res.accepted} updates, {len(res.versions)} versions, rejected "
                 f"{res.rejected}, t={res.sim_time:.0f}s (sync: {t:.0f}s)")

    def _initial_fedavg_state(self):
        from algorithms import registry

        return registry.get("fedavg").server(self.s["fedavg"], self._server_ctx()).initial_state()

    def async_figures(self) -> dict:
        r, n = self.results, len(self.domains)
        budget = self.s["rounds"] * n
        base = self.mean(r["slm_zero_shot"])
        sync = r["sync_curve"][-1]
        t_sync = r["sync_sim_seconds"]
        ac = r["async_curve"]
        same_updates = next((c for c in ac if c["updates"] >= budget), ac[-1])
        same_time = [c for c in ac if c["sim_time"] <= t_sync][-1]
        reach = next((c for c in ac if c["nll"] <= sync["nll"]), None)
        hist: dict[str, int] = {}
        for c in ac[1:]:
            for k, v in c["staleness"].items():
                hist[k] = hist.get(k, 0) + v
        gain = base - sync["nll"]
        bc = r["async_settings"]["buffered"]
        return {
            "domains": n, "rounds": self.s["rounds"], "client_updates": budget,
            "buffer_size": bc["buffer_size"], "concurrency": bc["concurrency"],
            "staleness": f"{bc['staleness']}:{bc['staleness_exponent']}",
            "server_lr": bc["server_lr"],
            "nll_slm_base": round(base, 4), "nll_sync": round(sync["nll"], 4),
            "nll_async": round(same_updates["nll"], 4),
            "async_vs_sync": round(same_updates["nll"] / sync["nll"], 4),
            "gain_retained": round((base - same_updates["nll"]) / gain, 4),
            "nll_async_same_time": round(same_time["nll"], 4),
            "async_vs_sync_same_time": round(same_time["nll"] / sync["nll"], 4),
            "gain_retained_same_time": round((base - same_time["nll"]) / gain, 4),
            "updates_async_same_time": same_time["updates"],
            "time_budget_reached": r["async_run"]["sim_time"] >= t_sync,
            "sim_seconds_sync": round(t_sync, 1),
            "sim_seconds_async": round(same_updates["sim_time"], 1),
            "time_to_sync_nll": round(reach["sim_time"] / t_sync, 4) if reach else None,
            "staleness_hist": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
            "rejected": r["async_run"]["rejected"],
            "nll_slm_fedavg_clients": round(self.mean(r["slm_fedavg"]), 4),
        }

    def plot_async(self, path: Path) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        r = self.results
        sc, ac = r["sync_curve"], r["async_curve"]
        bc = r["async_settings"]["buffered"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, key, label in ((axes[0], "sim_time", "simulated wall time (s)"),
                               (axes[1], "updates", "accepted client updates")):
            ax.plot([c[key] for c in sc], [c["nll"] for c in sc], "o-",
                    label="FedAvg (synchronous rounds)")
            ax.plot([c[key] for c in ac], [c["nll"] for c in ac], ".-",
                    label=f"FedBuff (K={bc['buffer_size']}, concurrency {bc['concurrency']}, "
                          f"{bc['staleness']} {bc['staleness_exponent']})")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].axvline(r["sync_sim_seconds"], color="grey", lw=0.8, ls="--")
        axes[1].axvline(self.s["rounds"] * len(self.domains), color="grey", lw=0.8, ls="--")
        axes[0].set_ylabel("SLM global: mean held-out token NLL (nats)")
        axes[0].legend(fontsize=8)
        fig.suptitle("cotune: synchronous FedAvg vs buffered asynchronous FedAvg (stragglers)")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    # -- figures --------------------------------------------------------------------------------
    def fedbiot(self) -> None:  # FedBiOT vs FedOT: bench/fedbiot_quality.py
        import fedbiot_quality

        fedbiot_quality.run(self)

    def fedmkt(self) -> None:  # heterogeneous clients: bench/fedmkt_quality.py
        import fedmkt_quality

        fedmkt_quality.run(self)

    def dev_nll(self, algo: str) -> float:
        """The LLM's mean dev NLL at the end of ``algo``'s run (FedPT: the proxy's at the alpha
        chosen on dev): what a grid chooses on."""
        r = self.results
        if algo == "fedpt":
            return min(r["proxy_dev_by_alpha"].values())
        return r[f"llm_{algo}_dev_curve"][-1]

    def adopted_settings(self, algo: str) -> dict:
        if algo == "fedmkt":  # built from the run's own settings by bench/fedmkt_quality.py
            import fedmkt_quality

            return fedmkt_quality.settings(self)
        return self.s[algo]

    def run_variant(self, name: str, overrides: dict) -> None:
        """Re-run the algorithms ``overrides`` touches with its settings; the baselines are the
        run's own. Results land in ``results["variants"][name]``."""
        adopted, self.results = self.results, dict(self.results)
        self.overrides = overrides
        try:
            out = {"overrides": overrides}
            for algo in overrides:
                self.say(f"variant {name}: {algo} with {overrides[algo]}")
                getattr(self, algo)()
                out[algo] = self.own_figures(algo)
                self.say(f"variant {name}: {algo} {json.dumps(out[algo])}")
        finally:
            self.results, self.overrides = adopted, {}
        adopted.setdefault("variants", {})[name] = out

    def own_figures(self, algo: str) -> dict:
        """``algo``'s figures without the baselines' (a variant shares those) plus its dev NLL."""
        fig = {k: v for k, v in self.figures([algo]).items()
               if not k.startswith("nll_") or k in FIG_NLL_KEYS}
        fig.pop("domains", None)
        fig.pop("rounds", None)
        return {**fig, "dev_nll": round(self.dev_nll(algo), 4)}

    def grid_choice(self, algo: str) -> dict:
        """The grid's values with their dev NLL and test figure, and the one dev chooses."""
        path, values = GRIDS[algo]
        rows = {}
        for v in values:
            rec = self.results["variants"].get(f"{algo}_grid_{v}")
            if rec is None:  # the adopted value
                rec = {algo: self.own_figures(algo)}
            rows[str(v)] = rec[algo]
        best = min(rows, key=lambda v: rows[v]["dev_nll"])
        return {"path": path, "by_value": rows, "chosen_on_dev": best}

    def ratio_ppl(self, a: str, b: str) -> float:
        ra, rb = self.results[a], self.results[b]
        return sum(ra[d]["ppl"] / rb[d]["ppl"] for d in self.domains) / len(self.domains)

    def figures(self, algos: list[str]) -> dict:
        if algos == ["fedbiot"]:
            import fedbiot_quality

            return fedbiot_quality.figures(self)
        r, m = self.results, self.mean
        out = {"domains": len(self.domains), "rounds": self.s["rounds"],
               "nll_llm_base": round(m(r["llm_zero_shot"]), 4), "nll_llm_centralized": round(m(r["llm_centralized"]), 4),
               "nll_slm_base": round(m(r["slm_zero_shot"]), 4), "nll_slm_standalone": round(m(r["slm_standalone"]), 4),
               "nll_slm_fedavg": round(m(r["slm_fedavg"]), 4)}
        gap = m(r["llm_zero_shot"]) - m(r["llm_centralized"])
        if "fedcollm" in algos:
            out["fedcollm"] = {
                "llm_gap_closed": round((m(r["llm_zero_shot"]) - m(r["llm_fedcollm"])) / gap, 4),
                "nll_llm": round(m(r["llm_fedcollm"]), 4), "nll_slm": round(m(r["slm_fedcollm"]), 4),
                "slm_vs_standalone": round(self.ratio_ppl("slm_fedcollm", "slm_standalone"), 4),
                "slm_vs_fedavg": round(self.ratio_ppl("slm_fedcollm", "slm_fedavg"), 4),
                "acc_llm": round(m(r["llm_fedcollm"], "acc"), 4)}
        if "fedpt" in algos:
            out["fedpt"] = {
                "proxy_gap_closed": round((m(r["llm_zero_shot"]) - m(r["llm_proxy"])) / gap, 4),
                "alpha": r["proxy_alpha"], "nll_proxy": round(m(r["llm_proxy"]), 4),
                "nll_slm": round(m(r["slm_fedpt"]), 4),
                "align_base": self.cfg("fedpt").get("align_base", {}) is not None,
                "nll_expert_slm": round(m(r["slm_fedpt_expert"]), 4),
                "nll_anti_expert_slm": round(m(r["slm_fedpt_anti"]), 4),
                "slm_vs_standalone": round(self.ratio_ppl("slm_fedpt", "slm_standalone"), 4),
                "slm_vs_fedavg": round(self.ratio_ppl("slm_fedpt", "slm_fedavg"), 4),
                "acc_proxy": round(m(r["llm_proxy"], "acc"), 4)}
        if "fedbiot" in algos:
            import fedbiot_quality

            out["fedbiot"] = fedbiot_quality.figures(self)
        if "fedmkt" in algos:
            import fedmkt_quality

            out["fedmkt"] = fedmkt_quality.figures(self)
        for a in algos:  # flat keys for the single-algorithm case the issue names
            if len(algos) == 1:
                out.update(out.pop(a))
        return out

    def plot(self, path: Path, algos: list[str]) -> None:
        if algos == ["fedbiot"]:
            import fedbiot_quality

            return fedbiot_quality.plot(self, path)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        r = self.results
        rows = [("LLM zero-shot", "llm_zero_shot"), ("LLM centralized", "llm_centralized")]
        if "fedcollm" in algos:
            rows.append(("LLM FedCoLLM", "llm_fedcollm"))
        if "fedpt" in algos:
            rows.append((f"LLM proxy (a={r['proxy_alpha']})", "llm_proxy"))
        if "fedmkt" in algos:
            rows.append(("LLM FedMKT", "llm_fedmkt"))
        rows += [("SLM zero-shot", "slm_zero_shot"), ("SLM standalone", "slm_standalone"), ("SLM FedAvg", "slm_fedavg")]
        if "fedcollm" in algos:
            rows.append(("SLM FedCoLLM", "slm_fedcollm"))
        if "fedpt" in algos:
            rows.append(("SLM FedPT", "slm_fedpt"))
        fig, ax = plt.subplots(figsize=(9, 4.5))
        w = 0.8 / len(rows)
        for i, (label, key) in enumerate(rows):
            xs = [j + i * w for j in range(len(self.domains))]
            ax.bar(xs, [r[key][d]["nll"] for d in self.domains], w, label=label)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(self.domains))])
        ax.set_xticklabels(self.domains)
        lo = min(r[k][d]["nll"] for _, k in rows for d in self.domains)
        ax.set_ylim(lo - 0.3, None)
        ax.set_ylabel("held-out token NLL (nats, lower is better)")
        ax.set_title("cotune quality benchmark: " + ", ".join(algos))
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def main() -> int:
    import warnings

    # peft warns that an adapter on a tied LM head complicates *merging*; nothing merges here
    warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithm", default="fedcollm,fedpt",
                    help="comma-separated: fedcollm, fedpt, fedbiot, fedmkt; or fedavg with --async")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--zoo", default="full", choices=["full", "bench", "full-repro", "bench-repro"],
                    help="the model zoo: full (default) or bench (`cotune zoo build --recipe bench`: a "
                         "10-layer LLM clearly stronger than its SLMs)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--drop-ratio", type=float, default=None,
                    help="--algorithm fedbiot: share of the LLM's middle layers the emulator drops "
                         "(default 0.5; the paper's compression is about 0.6)")
    ap.add_argument("--llm-teacher", choices=["slm", "proxy"], default=None,
                    help="FedCoLLM: what the LLM distils from (default: the settings' choice)")
    ap.add_argument("--no-align", action="store_true",
                    help="FedCoLLM, FedPT and FedMKT: keep the device's own SLM as base (and "
                         "FedPT's anti-expert): the papers' setting")
    ap.add_argument("--papers", action="store_true",
                    help="also run each algorithm at its paper's settings (all at once, and each "
                         "choice alone) beside the adopted ones, on this run's baselines")
    ap.add_argument("--grid", action="store_true",
                    help="also run the loss-weight grid (FedCoLLM lambda_kd, FedMKT lambda) and "
                         "report the value the dev split chooses")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:ALGO.PATH=VALUE[,...]",
                    help="an extra run of the algorithms it names with these settings changed "
                         "(e.g. 'k32:fedmkt.k=32'); repeatable")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--async", dest="async_", action="store_true",
                    help="with --algorithm fedavg: synchronous FedAvg vs buffered asynchronous "
                         "FedAvg (FedBuff) under simulated heterogeneous client speeds")
    ap.add_argument("--buffer-size", type=int, default=2, help="--async: K, updates per version")
    ap.add_argument("--concurrency", type=int, default=None,
                    help="--async: clients training at once (default: every client)")
    ap.add_argument("--max-staleness", type=int, default=4)
    ap.add_argument("--staleness", choices=["polynomial", "constant", "hinge"],
                    default="polynomial")
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="--async: seed of the client speeds")
    ap.add_argument("--dp", action="store_true",
                    help="with --algorithm fedavg: DP-FedAvg at epsilon 1, 4, 8 vs non-private FedAvg")
    ap.add_argument("--dp-epsilons", default="1,4,8")
    ap.add_argument("--dp-delta", type=float, default=1e-5)
    ap.add_argument("--dp-clip", type=float, default=None,
                    help="--dp: the clip C (default: the non-private run's round-1 global delta norm)")
    ap.add_argument("--async-max-factor", type=int, default=2,
                    help="--async: FedBuff stops after this many times the synchronous run's "
                         "client updates even if the synchronous wall time is not reached")
    args = ap.parse_args()
    algos = [a for a in args.algorithm.split(",") if a]
    if args.dp:
        if algos != ["fedavg"] or args.async_:
            ap.error("--dp runs DP-FedAvg: use --algorithm fedavg --dp")
        return run_dp(args)
    if args.async_ or "fedavg" in algos:
        if algos != ["fedavg"] or not args.async_:
            ap.error("--async compares FedAvg only: use --algorithm fedavg --async")
        return run_async(args)
    unknown = set(algos) - {"fedcollm", "fedpt", "fedbiot", "fedmkt"}
    if unknown:
        ap.error(f"unknown algorithms {sorted(unknown)}")
    b = Bench(args)
    b.zero_shot()
    if set(algos) - {"fedbiot"}:  # FedBiOT's baseline is FedOT, run by its own method
        b.centralized_llm()
        b.standalone()
        b.fedavg()
    for a in algos:
        getattr(b, a)()
    variants = variant_plan(args, algos, b)
    for i, (name, overrides) in enumerate(variants.items()):
        b.say(f"variant {i + 1}/{len(variants)}: {name}")
        b.run_variant(name, overrides)
    fig = b.figures(algos)
    if variants:
        fig["variants"] = {n: {a: v for a, v in rec.items() if a != "overrides"}
                           for n, rec in b.results["variants"].items()}
    if args.grid:
        fig["grid"] = {a: b.grid_choice(a) for a in algos if a in GRIDS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("-".join(algos) + ("-quick" if args.quick else "") + ("-noalign" if args.no_align else "")
           + ("-papers" if args.papers else "") + ("-grid" if args.grid else "")
           + ("-variants" if args.variant else "") + ("" if args.zoo == "full" else f"-{args.zoo}zoo"))
    (out / f"quality-{tag}.json").write_text(json.dumps({"figures": fig, **b.results}, indent=2, default=str))
    b.plot(out / f"quality-{tag}.png", algos)
    if variants:
        plot_variants(out / f"quality-{tag}-variants.png", b, algos)
    b.say(f"wrote {out / f'quality-{tag}.json'} and .png")
    fig["zoo"] = b.zoo.name  # the models the figures came from (recipe, key, checkpoint hashes)
    print("BENCH quality " + json.dumps(fig), flush=True)
    return 0


def variant_plan(args, algos: list[str], b: Bench) -> dict:
    """name -> {algorithm: {dotted path: value}} for --papers, --grid and --variant (a grid
    value equal to the adopted one is the adopted run itself)."""
    plan: dict = {}
    if args.papers:
        for a in algos:
            for name, ov in PAPER_VARIANTS.get(a, {}).items():
                plan[f"{a}_{name}"] = {a: ov}
    if args.grid:
        for a in algos:
            if a in GRIDS:
                path, values = GRIDS[a]
                adopted = get_path(b.adopted_settings(a), path)
                for v in values:
                    if v == adopted:
                        continue
                    plan[f"{a}_grid_{v}"] = {a: {path: v}}
    for text in args.variant:
        name, ov = parse_variant(text)
        unknown = set(ov) - set(algos)
        if unknown:
            raise SystemExit(f"--variant {name}: {sorted(unknown)} not in --algorithm")
        plan[name] = ov
    return plan


#: the headline figure of each algorithm, for the variants' plot
HEADLINE = {"fedcollm": "llm_gap_closed", "fedpt": "proxy_gap_closed", "fedmkt": "llm_gap_closed"}


def plot_variants(path: Path, b: Bench, algos: list[str]) -> None:
    """One panel per algorithm: the headline figure of the adopted settings and of each variant."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    algos = [a for a in algos if a in HEADLINE]
    fig_all = b.figures(algos)
    fig, axes = plt.subplots(1, len(algos), figsize=(4.5 * len(algos), 4), squeeze=False)
    for ax, a in zip(axes[0], algos, strict=True):
        own = fig_all.get(a, fig_all)
        labels, vals = ["adopted"], [own[HEADLINE[a]]]
        for name, rec in b.results.get("variants", {}).items():
            if a in rec.get("overrides", {}):
                labels.append(name.removeprefix(a + "_"))
                vals.append(rec[a][HEADLINE[a]])
        ax.barh(labels, vals, color=["C0"] + ["C1"] * (len(vals) - 1))
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
        ax.set_title(f"{a}: {HEADLINE[a]}")
        ax.invert_yaxis()
    fig.suptitle("adopted settings vs the papers' (same baselines, same run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_dp(args) -> int:
    """DP-FedAvg at several epsilons against the non-private FedAvg (same clients, rounds, steps)."""
    import numpy as np

    from cotune.simulate import simulate

    b = Bench(args)
    if args.quick and not args.rounds:  # a few minutes: four runs of the federation
        b.s["rounds"] = 3
        b.s["fedavg"]["train"]["max_steps"] = 30
    rounds, n = b.s["rounds"], len(b.domains)
    b.zero_shot()
    res = simulate("fedavg", b.s["fedavg"], b._server_ctx(), b._clients(), rounds, progress=None)
    base = b._final_slm(res)
    clip = args.dp_clip or float(res.rounds[0].server["global_delta_norm"])
    dims = sum(int(np.prod(v.shape)) for v in res.state.values())
    runs = {"non_private": {"nll": b.mean(base), "per_domain": base}}
    b.say(f"non-private FedAvg: mean test NLL {b.mean(base):.4f}; clip C = {clip:.4g}, {dims} adapter values")
    for eps in [float(e) for e in args.dp_epsilons.split(",") if e]:
        dp = {"mode": "central", "clip": clip, "target_epsilon": eps, "delta": args.dp_delta, "seed": 0}
        r = simulate("fedavg", b.s["fedavg"], b._server_ctx(), b._clients(), rounds, progress=None, dp=dp)
        per = b._final_slm(r)
        m = r.rounds[-1].server
        z = m["dp"]["noise_multiplier"]
        runs[f"eps_{eps:g}"] = {"epsilon_target": eps, "epsilon": m["dp_epsilon"], "noise_multiplier": z,
                                "nll": b.mean(per), "per_domain": per,
                                "noise_norm_over_clip": z * math.sqrt(dims) / n}
        b.say(f"DP-FedAvg eps {eps:g}: z {z:.3f}, spent {m['dp_epsilon']:.3f}, mean test NLL {b.mean(per):.4f}")
    fig = {"rounds": rounds, "clients_per_round": n, "clip": clip, "delta": args.dp_delta,
           "nll_zero_shot": b.mean(b.results["slm_zero_shot"]), "nll_non_private": runs["non_private"]["nll"],
           **{f"{k}_nll": v["nll"] for k, v in runs.items() if k != "non_private"},
           **{f"{k}_nll_ratio": v["nll"] / runs["non_private"]["nll"] for k, v in runs.items() if k != "non_private"},
           **{f"{k}_z": v["noise_multiplier"] for k, v in runs.items() if k != "non_private"},
           **{f"{k}_noise_norm_over_clip": v["noise_norm_over_clip"] for k, v in runs.items() if k != "non_private"}}
    b.results["dp"] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "fedavg-dp" + ("-quick" if args.quick else "")
    (out / f"quality-{tag}.json").write_text(json.dumps({"figures": fig, **b.results}, indent=2, default=str))
    _plot_dp(out / f"quality-{tag}.png", runs, fig)
    b.say(f"wrote {out / f'quality-{tag}.json'} and .png")
    fig["zoo"] = b.zoo.name  # the models the figures came from (recipe, key, checkpoint hashes)
    print("BENCH quality " + json.dumps(fig), flush=True)
    return 0


def _plot_dp(path: Path, runs: dict, fig: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [(v["epsilon_target"], v["nll"]) for k, v in runs.items() if k != "non_private"]
    f, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot([e for e, _ in eps], [v for _, v in eps], "o-", label="DP-FedAvg (central, q = 1)")
    ax.axhline(runs["non_private"]["nll"], color="k", ls="--", label="FedAvg, non-private")
    if fig.get("nll_zero_shot") is not None:
        ax.axhline(fig["nll_zero_shot"], color="grey", ls=":", label="zero-shot SLM")
    ax.set_xlabel(f"epsilon (delta {fig['delta']:g}, {fig['rounds']} rounds)")
    ax.set_yscale("log")
    ax.set_ylabel("mean held-out NLL (log scale)")
    ax.set_title(f"client-level DP, {fig['clients_per_round']} clients per round")
    ax.legend(fontsize=8)
    f.tight_layout()
    f.savefig(path, dpi=120)
    plt.close(f)


def run_async(args) -> int:
    b = Bench(args)
    b.fedavg_async()
    fig = b.async_figures()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "fedavg-async" + ("-quick" if args.quick else "")
    (out / f"quality-{tag}.json").write_text(json.dumps({"figures": fig, **b.results}, indent=2,
                                                        default=str))
    b.plot_async(out / f"quality-{tag}.png")
    b.say(f"wrote {out / f'quality-{tag}.json'} and .png")
    fig["zoo"] = b.zoo.name  # the models the figures came from (recipe, key, checkpoint hashes)
    print("BENCH quality " + json.dumps(fig), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
