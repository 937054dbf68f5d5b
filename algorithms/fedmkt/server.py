from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from algorithms.base import (
    ConfigError,
    RoundOutcome,
    RoundPlan,
    ServerAlgorithm,
    State,
    UpdateRejected,
    pack_state,
)
from algorithms.core.modeling import adapter_state, attach_lora, load_adapter_state, load_causal_lm
from algorithms.core.state_parts import delta_norm, part, to_numpy, to_torch
from algorithms.core.textdata import evaluate_nll
from algorithms.core.token_alignment import (
    Vocabulary,
    cached_vocab_map,
    dual_min_ce_batch,
    vocab_hash,
)
from algorithms.core.training import train_causal_lm
from algorithms.fedavg.server import wire_cast

from .config import FedMKTConfig
from .payload import LogitsPayload, PayloadError
from .public import (
    TeacherPayload,
    encode_public,
    family_adapter_blob,
    family_base_blob,
    model_payload,
    public_sha256,
    public_to_arrays,
    select_public,
    vocab_hash_of,
    vocab_to_arrays,
)
from .targets import AlignCounter, TargetDataset, aligned_targets, kd_term

log = logging.getLogger(__name__)

LLM = "llm"  # state prefix of the LLM's LoRA
TEACHER = "llm_topk"  # state prefix of the LLM's payload over D_p (next round's teacher blob)
HOLDOUT_NLL = "llm_holdout/nll"  # the LLM's NLL on the held-out public pieces (llm_holdout)
ADAPTER_PREFIX = "adapter/"  # update prefix of a client's adapter (fedavg_homogeneous)


@dataclass
class Family:
    """Client SLMs that share one tokenizer: the aggregator config names them as models roles
    "slm" or "slm:<name>" (a checkpoint directory, or only its tokenizer files)."""

    role: str
    path: str
    vocab: Vocabulary
    hash: str
    tokens: list[list[int]]  # the public set as this family reads it


class FedMKTServer(ServerAlgorithm):
    """Global state: the LLM's LoRA under ``llm/`` (absent for a black-box LLM in "llm2slm"
    mode), the LLM's top-k payload over D_p under ``llm_topk/`` (the teacher blob of the next
    round; the initial state carries the base LLM's), and with ``fedavg_homogeneous`` one
    averaged adapter per client family under ``adapter-<vocab hash[:16]>/``.

    Round (mode "mutual"): every client's payload is collected as it came (the updates differ
    in shape and must not be averaged); per public sample, DualMinCE picks the client of lowest
    CE if it beats the LLM's own CE (else, with ``keep_own="self"``, the LLM's own rows from
    before the step are the target; with "task" the sample has none); the chosen rows are
    aligned into the LLM's tokenisation
    (DTW) and vocabulary (MinED map per family, cached under ``work_dir/vocab_maps``); the LLM's
    LoRA trains on D_p with ``lambda * CE + (1 - lambda) * KD``; its new payload over D_p is the
    next round's teacher. "llm2slm": the LLM only teaches; adapter and payload stay as they are.
    Clients are visited in sorted order, so the result does not depend on arrival order.

    Order of a round (the paper's steps 1-5; the client half's docstring has the device side):
    ``finish_round(r)`` is steps 3-4 of round r: the LLM learns from the clients' round r
    payloads, and its payload on D_p after that step (the state's ``llm_topk/``) is what
    reaches the clients for their step 5 of round r: in the Task of round r + 1 (``llm_topk``
    blob, before that Task's local training), or after the last round in the final blobs,
    which :meth:`FedMKTClient.apply_final` distils from. The Task of round 1 carries no LLM
    payload (the initial state's ``llm_topk/`` is the base LLM's: only the server's DualMinCE
    of round 1 compares against it). The state is what it was before this ordering, so a
    restarted aggregator re-plans and re-runs a round to the same bytes."""

    name = "fedmkt"
    aggregation = "collect"

    def __init__(self, config: Mapping[str, Any], ctx):
        super().__init__(config, ctx)
        self.config = FedMKTConfig.from_dict(dict(config))
        self._backend = None
        self._model = None
        self._vocab: Vocabulary | None = None
        self._public: list[str] | None = None
        self._holdout: list[str] = []
        self._llm_tokens: list[list[int]] | None = None
        self._families: dict[str, Family] | None = None
        self._adapter_refs: dict[str, State] | None = None
        self._bases: dict[str, tuple[Any, Any]] = {}  # family hash -> (plain SLM, tokenizer)
        self._base_blobs: dict[str, bytes] = {}
        self.align_metrics: dict[str, dict] = {}

    # -- the LLM, D_p and the client families, built once ---------------------------------------
    def backend(self):
        if self._backend is None:
            backend = self.ctx.llm()
            if self.config.mode == "mutual" and getattr(backend, "kind", None) != "local":
                raise ConfigError(
                    "FedMKT mode 'mutual' trains the LLM's LoRA, so it needs llm.backend 'local'; "
                    "a black-box LLM can only teach (mode 'llm2slm')"
                )
            self._backend = backend
        return self._backend

    def llm_model(self):
        """The LLM with its LoRA (local backend), or None for a black box."""
        backend = self.backend()
        if self._model is None and getattr(backend, "kind", None) == "local":
            self._model = backend.trainable(self.config.llm_lora_spec(), seed=self.config.lora_seed)
        return self._model

    def llm_vocab(self) -> Vocabulary:
        if self._vocab is None:
            self._vocab = Vocabulary.from_tokenizer(self.backend().tokenizer())
        return self._vocab

    def public(self) -> list[str]:
        """D_p: the public pieces every side trains on (without the held-out ones)."""
        if self._public is None:
            cfg = self.config
            pieces = select_public(
                self.ctx.public_data(),
                cfg.public_max_samples,
                cfg.public_max_chars,
                split=cfg.public_split,
            )
            if not pieces:
                raise ConfigError(
                    "FedMKT transfers knowledge through logits on the public set D_p, and the "
                    "aggregator has none with two words or more (set public_data)"
                )
            if self.holds_out():
                every = max(2, round(1 / cfg.llm_holdout))
                self._holdout = pieces[every - 1 :: every]
                pieces = [p for i, p in enumerate(pieces) if i % every != every - 1]
                if not self._holdout:
                    raise ConfigError(
                        f"llm_holdout {cfg.llm_holdout} holds out every {every}th public piece, "
                        f"and there are only {len(pieces)}: lower it or add public data"
                    )
            self._public = pieces
        return self._public

    def holds_out(self) -> bool:
        return self.config.llm_holdout > 0 and self.config.mode == "mutual"

    def holdout_nll(self, model) -> float:
        """The LLM's mean token NLL on the held-out public pieces."""
        self.public()
        return evaluate_nll(
            model,
            self.backend().tokenizer(),
            self._holdout,
            block_size=self.config.public_block_size,
            batch_size=self.config.payload_batch_size,
        ).nll

    def llm_tokens(self) -> list[list[int]]:
        if self._llm_tokens is None:
            self._llm_tokens = encode_public(
                self.backend().tokenizer(), self.public(), self.config.public_block_size
            )
        return self._llm_tokens

    def families(self) -> dict[str, Family]:
        if self._families is None:
            roles = self.ctx.model_roles() if hasattr(self.ctx, "model_roles") else ["slm"]
            roles = [r for r in roles if r == "slm" or r.startswith("slm:")]
            if not roles:
                raise ConfigError(
                    "FedMKT maps each client family's logits into the LLM's vocabulary and needs "
                    "its tokenizer: list the client models as models roles 'slm' / 'slm:<name>'"
                )
            fams: dict[str, Family] = {}
            for role in roles:
                path = self.ctx.model_path(role)
                tok = _load_tokenizer(path)
                vocab = Vocabulary.from_tokenizer(tok)
                h = vocab_hash(vocab)
                if h in fams:
                    if self.config.fedavg_homogeneous:
                        raise ConfigError(
                            f"models roles {fams[h].role!r} and {role!r} share a tokenizer; with "
                            "fedavg_homogeneous a tokenizer must name one client model"
                        )
                    continue
                fams[h] = Family(
                    role,
                    path,
                    vocab,
                    h,
                    encode_public(tok, self.public(), self.config.public_block_size),
                )
            self._families = fams
        return self._families

    def _cache_dir(self) -> Path:
        return Path(self.ctx.work_dir) / "vocab_maps"

    def _llm_payload(self) -> TeacherPayload:
        tok = self.backend().tokenizer()
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        payload = model_payload(
            self.backend().logprobs,
            self.llm_tokens(),
            k=self.config.k,
            vocab_size=self.llm_vocab().size,
            pad_id=pad,
            batch_size=self.config.payload_batch_size,
        )
        return TeacherPayload(payload, self.llm_tokens(), public_sha256(self.public()))

    def _family_adapters(self) -> dict[str, State]:
        out = {}
        for fam in self.families().values():
            base, _, _ = load_causal_lm(fam.path, quant="fp32")
            out[family_adapter_blob(fam.hash)] = to_numpy(
                adapter_state(
                    attach_lora(base, self.config.lora_spec(), seed=self.config.lora_seed)
                )
            )
        return out

    # -- aligned family bases (align_base) ------------------------------------------------------
    def aligned_families(self) -> list[Family]:
        """The client families that get an aligned base: those that share the LLM's tokenizer
        (none with ``align_base`` null)."""
        if self.config.align_base is None:
            return []
        llm_hash = vocab_hash(self.llm_vocab())
        return [f for f in self.families().values() if f.hash == llm_hash]

    def family_base(self, fam: Family, state: State | None = None) -> tuple[Any, Any]:
        """(plain SLM, tokenizer) of an aligned family: aligned to the LLM on D_p before round 1
        (no state), restored from the state's ``base-<hash>/`` part after."""
        if fam.hash not in self._bases:
            from algorithms.core.aligned_base import batch_teacher, prepare_base

            try:
                plain, tok, _ = load_causal_lm(fam.path, quant="fp32")
            except Exception as exc:  # a tokenizer-only directory, a broken checkpoint, ...
                raise ConfigError(
                    f"align_base distils the LLM into family {fam.role!r} and needs its full "
                    f"checkpoint at {fam.path} ({type(exc).__name__}: {exc}); set align_base to "
                    "null or point the models role at the checkpoint"
                ) from exc
            def teacher():
                return batch_teacher(self.backend().logprobs)

            metrics = prepare_base(plain, self.config.align_base, state, teacher, self.public, tok,
                                   self.ctx.log, prefix=family_base_blob(fam.hash))
            self._bases[fam.hash] = (plain, tok)
            if metrics:
                self.align_metrics[fam.role] = metrics
        return self._bases[fam.hash]

    def _base_blobs_of(self, state: State) -> dict[str, bytes]:
        from algorithms.core.aligned_base import pack_base

        out = {}
        for fam in self.aligned_families():
            name = family_base_blob(fam.hash)
            if name not in self._base_blobs:  # the same bytes every round: pushed once
                self._base_blobs[name] = pack_base(*self.family_base(fam, state))
            out[name] = self._base_blobs[name]
        return out

    # -- the contract -------------------------------------------------------------------------
    def initial_state(self) -> State:
        self.families()  # fail early on missing tokenizers
        state: State = {}
        if self.config.align_base is not None:
            from algorithms.core.aligned_base import base_weights

            aligned = {f.hash for f in self.aligned_families()}
            for fam in self.families().values():
                if fam.hash in aligned:
                    plain, _ = self.family_base(fam)
                    state.update(_prefixed(family_base_blob(fam.hash), to_numpy(base_weights(plain))))
                else:
                    self.ctx.log(f"family {fam.role!r} keeps its own base: align_base needs the "
                                 "LLM's tokenizer (its top-k alignment is too lossy to distil a base)")
        model = self.llm_model()
        if model is not None:  # a fresh LoRA, whatever a shared backend's adapter went through
            omega = _fresh_lora(adapter_state(model), self.config.lora_seed)
            load_adapter_state(model, omega)
            state.update(_prefixed(LLM, to_numpy(omega)))
            if self.holds_out():
                state[HOLDOUT_NLL] = np.array([self.holdout_nll(model)], dtype=np.float64)
        state.update(_prefixed(TEACHER, self._llm_payload().to_arrays()))
        if self.config.fedavg_homogeneous:
            for name, adapter in self._family_adapters().items():
                state.update(_prefixed(name, adapter))
        return state

    def client_config(self) -> dict:
        return self.config.client_dict()

    def plan_round(self, round: int, state: State) -> RoundPlan:
        """The Task of round ``round``: D_p, the LLM's vocabulary and, from round 2 on, the LLM's
        payload after its round ``round - 1`` step (the clients' step 5 of that round)."""
        blobs = self._teacher_blobs(state, with_payload=round > 1)
        blobs.update(self._family_adapter_blobs(state))
        blobs.update(self._base_blobs_of(state))
        return RoundPlan(config=self.client_config(), blobs=blobs)

    def _teacher_blobs(self, state: State, with_payload: bool = True) -> dict[str, bytes]:
        blobs = {
            "public": pack_state(public_to_arrays(self.public())),
            "llm_vocab": pack_state(vocab_to_arrays(self.llm_vocab())),
        }
        if with_payload:
            blobs["llm_topk"] = pack_state(part(state, TEACHER))
        return blobs

    def _family_adapter_blobs(self, state: State) -> dict[str, bytes]:
        """With ``fedavg_homogeneous``, each family's averaged adapter (else none)."""
        if not self.config.fedavg_homogeneous:
            return {}
        names = (family_adapter_blob(f.hash) for f in self.families().values())
        return {n: pack_state(wire_cast(part(state, n), self.config.wire_dtype)) for n in names}

    def update_spec_state(self, state: State) -> State:
        return {}  # collected updates are checked by validate_client_update

    def validate_client_update(self, tensors: State, client: str) -> State:
        try:
            h = vocab_hash_of(tensors)
        except PayloadError as exc:
            raise UpdateRejected("names", str(exc)) from None
        fam = self.families().get(h)
        if fam is None:
            raise UpdateRejected(
                "vocabulary",
                f"vocabulary {h[:16]} is not one the aggregator knows (models roles "
                f"{sorted(f.role for f in self.families().values())}); add the "
                "client's tokenizer as models role 'slm:<name>'",
            )
        for name in ("topk_values", "sample_ce"):
            arr = tensors.get(name)
            if isinstance(arr, np.ndarray) and arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise UpdateRejected("non_finite", f"{name} holds NaN or infinite values")
        try:
            payload = LogitsPayload.from_arrays(tensors)
        except PayloadError as exc:
            raise UpdateRejected("payload", str(exc)) from None
        public = self.public()
        if payload.num_samples != len(public):
            raise UpdateRejected(
                "shape", f"payload has {payload.num_samples} samples, the public set {len(public)}"
            )
        if payload.vocab_size > fam.vocab.size:
            raise UpdateRejected(
                "payload", f"vocab_size {payload.vocab_size} exceeds the family's {fam.vocab.size}"
            )
        if payload.k != min(self.config.k, payload.vocab_size):
            raise UpdateRejected(
                "shape", f"payload has k={payload.k}, the round asks for {self.config.k}"
            )
        want = np.asarray([len(t) - 1 for t in fam.tokens], dtype=np.int64)
        bad = np.nonzero(payload.lengths != want)[0]
        if len(bad):
            s = int(bad[0])
            raise UpdateRejected(
                "shape",
                f"{len(bad)} public samples have the wrong number of rows (sample {s}: "
                f"{int(payload.lengths[s])}, its tokenisation gives {int(want[s])})",
            )
        kept = {**payload.to_arrays(), "vocab_hash": tensors["vocab_hash"]}
        adapter = {
            k[len(ADAPTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)
        }
        if self.config.fedavg_homogeneous:
            self._check_adapter(adapter, fam)
            kept.update({ADAPTER_PREFIX + k: v for k, v in adapter.items()})
        return kept

    def _check_adapter(self, adapter: State, fam: Family) -> None:
        if self._adapter_refs is None:  # names, shapes and wire dtypes of each family's adapter
            self._adapter_refs = {
                name: wire_cast(a, self.config.wire_dtype)
                for name, a in self._family_adapters().items()
            }
        ref = self._adapter_refs[family_adapter_blob(fam.hash)]
        if set(adapter) != set(ref):
            raise UpdateRejected(
                "names", f"adapter tensors differ from the family's ({len(adapter)} vs {len(ref)})"
            )
        for k, v in adapter.items():
            if not isinstance(v, np.ndarray) or v.dtype != ref[k].dtype:
                raise UpdateRejected("dtype", f"adapter tensor {k!r} must be {ref[k].dtype}")
            if v.shape != ref[k].shape:
                raise UpdateRejected(
                    "shape", f"adapter tensor {k!r} has shape {v.shape}, expected {ref[k].shape}"
                )
            if v.dtype.kind == "f" and not np.isfinite(v).all():
                raise UpdateRejected(
                    "non_finite", f"adapter tensor {k!r} holds NaN or infinite values"
                )

    def finish_round(
        self, round: int, state: State, aggregate: Mapping[str, State]
    ) -> RoundOutcome:
        clients = sorted(aggregate)
        fams = self.families()
        teacher_now = TeacherPayload.from_arrays(part(state, TEACHER))
        own_ce = teacher_now.payload.sample_ce.astype(np.float64)
        ces, family_of = [], {}
        for c in clients:
            t = aggregate[c]
            ces.append(np.asarray(t["sample_ce"], np.float64))
            family_of[c] = vocab_hash_of(t)
            if family_of[c] not in fams:
                raise ConfigError(
                    f"client {c}'s family {family_of[c][:16]} is no longer configured"
                )
        chosen = dual_min_ce_batch(np.stack(ces), own_ce)
        metrics: dict = {
            "public_samples": len(own_ce),
            "llm_ce_before": float(own_ce.mean()),
            "kept_own": int((chosen < 0).sum()),
            "selected": {c: int((chosen == i).sum()) for i, c in enumerate(clients)},
        }
        out = dict(state)
        if self.config.mode == "mutual":
            targets, counter = {}, AlignCounter()
            for i, c in enumerate(clients):
                samples = np.nonzero(chosen == i)[0].tolist()
                if not samples:
                    continue
                payload = LogitsPayload.from_arrays(aggregate[c])
                fam = fams[family_of[c]]
                vmap = cached_vocab_map(fam.vocab, self.llm_vocab(), cache_dir=self._cache_dir())
                for s in samples:
                    values, ids = payload.sample(s)
                    t = aligned_targets(
                        self.llm_tokens()[s],
                        self.llm_vocab(),
                        fam.tokens[s],
                        fam.vocab,
                        values,
                        ids,
                        vmap,
                        rule=self.config.align_rule,
                        own=teacher_now.payload.sample(s) if self.config.keep_own == "self" else None,
                    )
                    targets[s] = (t.values, t.ids)
                    counter.add(t)
            if self.config.keep_own == "self":  # the LLM's own rows from before this step
                for s in np.nonzero(chosen < 0)[0].tolist():
                    targets[s] = teacher_now.payload.sample(s)
            metrics.update(self._train_llm(round, state, targets))
            metrics.update(counter.metrics())
            if self._judge_llm_step(state, out, metrics):
                omega = to_numpy(adapter_state(self.llm_model()))
                metrics["llm_delta_norm"] = delta_norm(omega, part(state, LLM))
                teacher = self._llm_payload()
                metrics["llm_ce_after"] = float(teacher.payload.sample_ce.mean())
                out.update(_prefixed(LLM, omega))
                out = {k: v for k, v in out.items() if not k.startswith(TEACHER + "/")}
                out.update(_prefixed(TEACHER, teacher.to_arrays()))
        if self.config.fedavg_homogeneous:
            out.update(self._average_families(clients, aggregate, family_of, metrics))
        return RoundOutcome(out, metrics)

    def _judge_llm_step(self, state: State, out: State, metrics: dict) -> bool:
        """With ``llm_holdout``: keep the step only where it lowers the held-out public NLL
        (otherwise the LLM goes back to the state's adapter); True when the step stands."""
        if not self.holds_out():
            return True
        model = self.llm_model()
        nll = self.holdout_nll(model)
        best = float(state[HOLDOUT_NLL][0]) if HOLDOUT_NLL in state else float("inf")
        metrics["llm_holdout_nll"] = _round4(nll)
        if nll < best:
            metrics["llm_step"] = "applied"
            out[HOLDOUT_NLL] = np.array([nll], dtype=np.float64)
            return True
        metrics["llm_step"] = "rejected"
        load_adapter_state(model, to_torch(part(state, LLM)))
        self.ctx.log(
            f"LLM step rejected: held-out public NLL {nll:.4f} is not below {best:.4f}; "
            "the LLM and its teacher payload stay as they were"
        )
        return False

    def _train_llm(self, round: int, state: State, targets: dict) -> dict:
        model = self.llm_model()
        load_adapter_state(model, to_torch(part(state, LLM)))
        cfg = self.config.llm_train_config(round)
        tok = self.backend().tokenizer()
        data = TargetDataset(
            tok,
            self.llm_tokens(),
            targets,
            cfg.block_size or self.config.public_block_size,
            seed=cfg.seed,
        )
        result = train_causal_lm(
            model,
            data,
            replace(cfg, block_size=data.block_size),
            progress=None,
            extra_loss=kd_term(self.config.kd_weight, self.config.temperature, self.config.kd_kind, self.config.kd_tail),
        )
        self.ctx.log(
            f"round {round}: LLM trained {result.steps} steps on {len(self.public())} public samples "
            f"({len(targets)} with a client teacher)"
        )
        return {
            "llm_kd_samples": len(targets),
            "steps": result.steps,
            "llm_train": result.to_dict(),
        }

    def _average_families(self, clients, aggregate, family_of, metrics) -> State:
        weights = getattr(aggregate, "weights", {})
        out: State = {}
        for h in sorted(set(family_of.values())):
            members = [c for c in clients if family_of[c] == h]
            total, sums = 0.0, {}
            for c in members:
                w = float(weights.get(c, 1.0))
                for k, v in aggregate[c].items():
                    if k.startswith(ADAPTER_PREFIX):
                        name = k[len(ADAPTER_PREFIX) :]
                        sums[name] = sums.get(name, 0.0) + w * _decode(v)
                total += w
            if sums:
                out.update(
                    _prefixed(
                        family_adapter_blob(h),
                        {k: (v / total).astype(np.float32) for k, v in sums.items()},
                    )
                )
                metrics.setdefault("family_clients", {})[h[:16]] = len(members)
        return out

    def final_blobs(self, state: State) -> dict[str, bytes]:
        """The aligned family bases, with ``fedavg_homogeneous`` each family's averaged adapter
        (otherwise every client keeps its own), and D_p, the LLM's vocabulary and its payload
        after the last round's step: the clients' last LLM->SLM transfer (step 5 of the last
        round), which :meth:`FedMKTClient.apply_final` applies."""
        return {
            **self._base_blobs_of(state),
            **self._family_adapter_blobs(state),
            **self._teacher_blobs(state),
        }

    # -- for evaluation -------------------------------------------------------------------------
    def llm_with(self, state: State):
        """The LLM carrying the state's LoRA (local backend)."""
        model = self.llm_model()
        if model is None:
            raise ConfigError("a black-box LLM has no adapter to load")
        load_adapter_state(model, to_torch(part(state, LLM)))
        return model


def _prefixed(prefix: str, tensors: Mapping[str, np.ndarray]) -> State:
    return {f"{prefix}/{k}": v for k, v in tensors.items()}


def _fresh_lora(template: Mapping[str, Any], seed: int) -> dict:
    """LoRA tensors shaped like ``template`` with peft's default initialisation, drawn from a
    generator seeded by ``seed``: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform,
    a=sqrt(5)), B = 0 (embedding LoRA: A = 0, B ~ N(0, 1)), so the adapter starts as a no-op.
    Other tensors (a DoRA magnitude) are kept."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for name, t in sorted(template.items()):
        parts = name.split(".")
        if "lora_A" in parts:
            bound = 1.0 / float(t.shape[1]) ** 0.5
            out[name] = (torch.rand(t.shape, generator=gen) * 2 - 1) * bound
        elif "lora_embedding_B" in parts:
            out[name] = torch.randn(t.shape, generator=gen)
        elif "lora_B" in parts or "lora_embedding_A" in parts:
            out[name] = torch.zeros(t.shape)
        else:
            out[name] = t.clone()
    return out


def _decode(arr: np.ndarray) -> np.ndarray:
    from algorithms.core.lora_state import from_wire

    return from_wire({"x": arr})["x"].numpy().astype(np.float64)


def _round4(x: float) -> float:
    return round(x, 4)


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises several types for a missing or broken tokenizer
        raise ConfigError(
            f"cannot load a tokenizer from {path} ({type(exc).__name__}: {exc})"
        ) from exc
