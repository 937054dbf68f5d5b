from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from algorithms.base import ClientAlgorithm, ClientReport, pack_state, unpack_state
from algorithms.core.aligned_base import use_sent_base
from algorithms.core.lora_state import from_wire, to_wire
from algorithms.core.modeling import adapter_state, load_adapter_state
from algorithms.core.state_parts import to_numpy, to_torch
from algorithms.core.token_alignment import (
    Vocabulary,
    cached_vocab_map,
    dual_min_ce_batch,
    vocab_hash,
)
from algorithms.fedavg.client import held_out_metrics

from .config import FedMKTConfig
from .payload import PayloadError
from .public import (
    TeacherPayload,
    encode_public,
    family_adapter_blob,
    family_base_blob,
    family_of_blob,
    model_payload,
    public_from_arrays,
    public_sha256,
    vocab_from_arrays,
    vocab_hash_array,
)
from .targets import AlignCounter, TargetDataset, aligned_targets, kd_term

log = logging.getLogger(__name__)

ADAPTER_PREFIX = "adapter/"


def forward_of(model) -> Any:
    """``forward(ids, mask) -> logits`` in eval mode (restored afterwards), on the model's device."""

    def forward(ids, mask):
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            return model(
                input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
            ).logits
        finally:
            model.train(was)

    return forward


class _AdapterStore:
    """The client's own adapter between rounds, in its workspace: FedMKT clients keep
    personal adapters (nothing global replaces them), so a restarted device resumes from the
    adapter its last round produced. One file per round; the newest before a round is loaded."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, round: int) -> Path:
        return self.folder / f"adapter-{round:05d}.safetensors"

    def save(self, model, round: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(round).with_suffix(".tmp")
        tmp.write_bytes(pack_state(to_numpy(adapter_state(model))))
        tmp.replace(self._path(round))
        for old in sorted(self.folder.glob("adapter-*.safetensors"))[:-2]:
            old.unlink(missing_ok=True)

    def save_final(self, model) -> None:
        """The adapter after the last LLM->SLM transfer (``apply_final``); never a round's."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "final.safetensors"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pack_state(to_numpy(adapter_state(model))))
        tmp.replace(path)

    def load_latest(self, model, before: int | None = None) -> int | None:
        rounds = sorted(
            int(p.stem.split("-")[1]) for p in self.folder.glob("adapter-*.safetensors")
        )
        rounds = [r for r in rounds if before is None or r < before]
        if not rounds:
            return None
        load_adapter_state(model, to_torch(unpack_state(self._path(rounds[-1]).read_bytes())))
        return rounds[-1]


class FedMKTClient(ClientAlgorithm):
    """The device half. The paper's round r is: 1. local training on D_k, 2. upload of the
    SLM's top-k payload on D_p, 3.-4. the server's SLM->LLM step and the LLM's payload on D_p
    sent back, 5. LLM->SLM distillation. Steps 3-4 need every client's step 2, so one Task
    cannot hold a whole round; the Task of round r holds step 5 of round r - 1 and steps 1-2
    of round r, and the last step 5 comes with the final blobs (:meth:`apply_final`):

    1. start from the own adapter of the previous round (or, with ``fedavg_homogeneous``, the
       family's averaged adapter the Task carries);
    2. step 5 of round r - 1, in every Task but the first (whose Task carries no ``llm_topk``:
       the base LLM has learned nothing of the clients yet, and the paper's round 1 begins with
       local training): the LLM's top-k payload on D_p from the end of the server's round
       r - 1 step (``llm_topk``, it has absorbed the clients' round r - 1 payloads) and its
       vocabulary (``llm_vocab``); DualMinCE with one teacher keeps the public samples where
       the LLM's CE is below this model's own, whose LLM rows are aligned into this
       tokenizer (DTW + agreement rule ``align_rule`` + MinED map, cached in the workspace);
       the LoRA trains on D_p with ``lambda * CE + (1 - lambda) * KD`` (``kd_train``); on the
       other samples the KD target is this model's own rows from before the step
       (``keep_own="self"``) or there is none (``"task"``: the task loss alone);
    3. step 1 of round r: task training on D_k (``train``), as without FedMKT;
    4. step 2 of round r: run the SLM over D_p and upload its top-k payload + per-sample CE and
       the vocabulary hash (+ the adapter, with ``fedavg_homogeneous``).

    The SLM's sequence of steps is the paper's (task step, upload, distillation from the LLM
    that learned from that upload, next task step, ...), and each client ends with the last
    LLM->SLM transfer. Deviation: with ``fedavg_homogeneous`` the family average is taken of
    the uploaded adapters (after step 1) instead of after step 5, which would need a second
    exchange per round.
    """

    name = "fedmkt"
    _vocab_of: tuple | None = None  # (tokenizer, its Vocabulary, its hash)

    def needs_blob(self, name: str, ctx) -> bool:
        """Shared blobs, and of the per-family ones (aligned base, averaged adapter) only this
        device's family's: another family's base is a whole model it has no use for."""
        family = family_of_blob(name)
        return family is None or family == self._own_vocab(ctx)[1][:16]

    def _own_vocab(self, ctx) -> tuple[Vocabulary, str]:
        """The device tokenizer's vocabulary and its hash (its family), built once per tokenizer:
        ``needs_blob`` asks for every blob of a Task, then ``run`` again."""
        tok = ctx.tokenizer()
        if self._vocab_of is None or self._vocab_of[0] is not tok:
            vocab = Vocabulary.from_tokenizer(tok)
            self._vocab_of = (tok, vocab, vocab_hash(vocab))
        return self._vocab_of[1], self._vocab_of[2]

    def run(self, task, downloads: Mapping[str, bytes], ctx) -> ClientReport:
        cfg = FedMKTConfig.from_dict(task.config)
        own_hash = self._own_vocab(ctx)[1]
        use_sent_base(downloads, ctx, family_base_blob(own_hash))  # its family's aligned base, if sent
        model = ctx.model(cfg.lora_spec())
        tok = ctx.tokenizer()
        own_vocab, sent_hash = self._own_vocab(ctx)
        if sent_hash != own_hash:
            raise PayloadError("the aligned base the aggregator sent has another tokenizer than this device")
        store = _AdapterStore(Path(ctx.workspace()) / "fedmkt")
        family = downloads.get(family_adapter_blob(own_hash)) if cfg.fedavg_homogeneous else None
        if family is not None:
            load_adapter_state(model, from_wire(unpack_state(family)))
        else:
            store.load_latest(model, before=task.round)
        public, own_ids, payload = _public_payload(cfg, downloads, tok, model, own_vocab.size)
        before = held_out_metrics(ctx, cfg.eval_block_size)
        private = ctx.private_data()
        kd = {}
        if "llm_topk" in downloads:  # step 5 of round r - 1 (see the class docstring)
            kd = self._distil_from_llm(cfg, downloads, ctx, public, own_ids, payload, task.round)
        result = ctx.train(private, cfg.train_config())
        after = held_out_metrics(ctx, cfg.eval_block_size)
        mine = payload()
        store.save(model, task.round)
        tensors = {**mine.to_arrays(), "vocab_hash": vocab_hash_array(own_hash)}
        if cfg.fedavg_homogeneous:
            tensors.update(
                {
                    ADAPTER_PREFIX + k: v
                    for k, v in to_wire(adapter_state(model), cfg.wire_dtype).items()
                }
            )
        metrics = {
            "train": result.to_dict(),
            **kd,
            "public_ce_mean": float(np.mean(mine.sample_ce)),
            "vocab_hash": own_hash[:16],
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()},
        }
        return ClientReport(num_examples=len(private), tensors=tensors, metrics=metrics)

    def _distil_from_llm(self, cfg, downloads, ctx, public, own_ids, payload, seed_round) -> dict:
        """The paper's step 5 on the model ``payload`` runs: DualMinCE against the LLM's payload,
        its rows aligned into this tokenizer, KD + CE on D_p. Returns the step's metrics."""
        own_vocab = self._own_vocab(ctx)[0]
        tok = ctx.tokenizer()
        teacher = TeacherPayload.from_arrays(unpack_state(downloads["llm_topk"]))
        if teacher.public_digest != public_sha256(public) or teacher.payload.num_samples != len(
            public
        ):
            raise PayloadError("the LLM payload was computed on another public set than the Task's")
        llm_vocab = vocab_from_arrays(unpack_state(downloads["llm_vocab"]))
        own = payload()
        own_ce = own.sample_ce
        chosen = dual_min_ce_batch(teacher.payload.sample_ce[None, :], own_ce)
        vmap = cached_vocab_map(llm_vocab, own_vocab, cache_dir=Path(ctx.workspace()) / "vocab_maps")
        targets, counter = {}, AlignCounter()
        for s in np.nonzero(chosen == 0)[0].tolist():
            values, ids = teacher.payload.sample(s)
            t = aligned_targets(
                own_ids[s], own_vocab, teacher.tokens[s], llm_vocab, values, ids, vmap,
                rule=cfg.align_rule, own=own.sample(s) if cfg.keep_own == "self" else None,
            )
            targets[s] = (t.values, t.ids)
            counter.add(t)
        kd = {
            "kd_samples": len(targets),
            "kept_own": int((chosen != 0).sum()),
            "public_samples": len(public),
            **counter.metrics(),
            "own_ce_mean": float(np.mean(own_ce)),
            "llm_ce_mean": float(np.mean(teacher.payload.sample_ce)),
        }
        if cfg.keep_own == "self":  # this model's own rows from before the step
            for s in np.nonzero(chosen != 0)[0].tolist():
                targets[s] = own.sample(s)
        kd["kd_targets"] = len(targets)
        kd_cfg = cfg.kd_train_config(seed_round)
        data = TargetDataset(tok, own_ids, targets, cfg.public_block_size, seed=kd_cfg.seed)
        distilled = ctx.train(
            data,
            replace(kd_cfg, block_size=data.block_size),
            extra_loss=kd_term(cfg.kd_weight, cfg.temperature, cfg.kd_kind, cfg.kd_tail),
        )
        kd["kd_train"] = distilled.to_dict()
        return kd

    def apply_final(
        self, downloads: Mapping[str, bytes], ctx, config: Mapping | None = None
    ) -> dict:
        """FedMKT has no global client model: each client keeps its own adapter (its family's
        average with ``fedavg_homogeneous``, when the final blobs carry it), takes the last
        LLM->SLM transfer (step 5 of the last round: the final blobs carry the LLM's payload on
        D_p after its last step, ``llm_topk``) and evaluates the result (``kd_final``: that
        step's metrics). The distilled adapter is kept in the workspace beside the rounds'
        (``final.safetensors``); applying the same final blobs again starts from the last
        round's adapter, so it gives the same model."""
        cfg = FedMKTConfig.from_dict(dict(config or {}))
        own_hash = self._own_vocab(ctx)[1]
        use_sent_base(downloads, ctx, family_base_blob(own_hash))
        model = ctx.model(cfg.lora_spec())
        store = _AdapterStore(Path(ctx.workspace()) / "fedmkt")
        family = downloads.get(family_adapter_blob(own_hash))
        last = None
        if family is not None:
            load_adapter_state(model, from_wire(unpack_state(family)))
        else:
            last = store.load_latest(model)
        out = {}
        if "llm_topk" in downloads:
            public, own_ids, payload = _public_payload(
                cfg, downloads, ctx.tokenizer(), model, self._own_vocab(ctx)[0].size
            )
            seed_round = (last if last is not None else int(getattr(ctx, "round", 0) or 0)) + 1
            out["kd_final"] = self._distil_from_llm(
                cfg, downloads, ctx, public, own_ids, payload, seed_round
            )
            store.save_final(model)
        return {
            **{f"{k}_final": v for k, v in held_out_metrics(ctx, cfg.eval_block_size).items()},
            **out,
        }


def _public_payload(cfg, downloads, tok, model, vocab_size: int):
    """D_p as sent, its token ids under this device's tokenizer, and a function that computes
    this model's top-k payload on it (used for the round's upload and for the KD steps)."""
    public = public_from_arrays(unpack_state(downloads["public"]))
    own_ids = encode_public(tok, public, cfg.public_block_size)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def payload():
        return model_payload(
            forward_of(model),
            own_ids,
            k=cfg.k,
            vocab_size=vocab_size,
            pad_id=pad,
            batch_size=cfg.payload_batch_size,
        )

    return public, own_ids, payload
