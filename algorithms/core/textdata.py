"""Turn private text data into fixed-size token blocks for causal-LM training and evaluation.

Two input forms are accepted (not mixed):

- plain texts (``str``, or ``{"text": ...}``): every text is tokenized, ``eos`` is appended,
  all tokens are concatenated and cut into blocks of ``block_size`` ("packing"); the last
  partial block is kept and padded. Every real token carries loss.
- instruction pairs (``(prompt, response)`` tuples/lists, or ``{"prompt": ..., "response": ...}``):
  one example per pair, ``prompt + response + eos``, right-padded to ``block_size``; labels are
  ``-100`` on the prompt and on padding, so the loss covers only the response and its ``eos``.
  When a pair is longer than a block, the response is kept (up to the whole block) and the
  prompt is cut from the left.

Labels use the Hugging Face convention: ``labels[i]`` is the token at position ``i`` and the
model predicts it from positions ``< i`` (the shift happens in the loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from algorithms.core.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "EvalResult",
    "TokenizedDataset",
    "causal_lm_token_stats",
    "evaluate_nll",
]

IGNORE_INDEX = -100


def _classify(item: Any) -> tuple[str, Any]:
    if isinstance(item, str):
        return "text", item
    if isinstance(item, Mapping):
        if "prompt" in item or "response" in item:
            if "prompt" not in item or "response" not in item:
                raise DataError(
                    f"pair dict needs both 'prompt' and 'response' keys, got {sorted(item)}"
                )
            return "pairs", (item["prompt"], item["response"])
        if "text" in item:
            return "text", item["text"]
        raise DataError(
            f"dict example needs 'text' or 'prompt'+'response' keys, got {sorted(item)}"
        )
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return "pairs", (item[0], item[1])
    raise DataError(
        f"unsupported example of type {type(item).__name__}; use str, (prompt, response), "
        "or a dict with 'text' or 'prompt'/'response'"
    )


class TokenizedDataset(torch.utils.data.Dataset):
    """Token blocks of one client's private data.

    Each row is a dict of 1-D ``LongTensor`` of length ``block_size``: ``input_ids``,
    ``attention_mask`` (0 on padding) and ``labels`` (-100 where no loss). Iteration order for
    training comes from :meth:`order` / :meth:`batches`, deterministic in ``(seed, epoch)``.

    ``num_examples``: rows (packed blocks or pairs). ``num_tokens``: real (non-pad) tokens.
    ``num_loss_tokens``: tokens that carry loss (label != -100).
    """

    def __init__(
        self,
        tokenizer: Any,
        data: Iterable[Any],
        block_size: int,
        *,
        seed: int = 0,
        add_eos: bool = True,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
        if isinstance(data, (str, bytes)):
            raise DataError("data must be an iterable of examples, not a single string")
        self.block_size = block_size
        self.seed = int(seed)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise DataError("tokenizer has neither a pad nor an eos token")
        self.pad_token_id = int(pad)
        self.eos_token_id = tokenizer.eos_token_id if add_eos else None

        kinds: set[str] = set()
        items: list[Any] = []
        for raw in data:
            kind, value = _classify(raw)
            kinds.add(kind)
            items.append(value)
        if not items:
            raise DataError("dataset is empty")
        if len(kinds) > 1:
            raise DataError("dataset mixes plain texts and prompt/response pairs; split them")
        self.kind = kinds.pop()
        if self.kind == "text":
            rows = self._pack(tokenizer, items)
        else:
            rows = self._pairs(tokenizer, items)
        if not rows:
            raise DataError("dataset produced no tokens (all texts empty?)")
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        labels = torch.tensor([r[1] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[2] for r in rows], dtype=torch.long)
        self.input_ids, self.labels, self.attention_mask = ids, labels, mask
        self.num_examples = int(ids.shape[0])
        self.num_tokens = int(mask.sum())
        self.num_loss_tokens = int((labels != IGNORE_INDEX).sum())
        self.num_source_examples = len(items)

    # -- building ------------------------------------------------------------------------
    @staticmethod
    def _encode(tokenizer: Any, texts: list[str], special: bool) -> list[list[int]]:
        for t in texts:
            if not isinstance(t, str):
                raise DataError(f"expected text, got {type(t).__name__}")
        if not texts:
            return []
        enc = tokenizer(texts, add_special_tokens=special)
        return [list(x) for x in enc["input_ids"]]

    def _pack(
        self, tokenizer: Any, texts: list[str]
    ) -> list[tuple[list[int], list[int], list[int]]]:
        stream: list[int] = []
        for ids in self._encode(tokenizer, texts, special=True):
            if not ids:
                continue
            stream.extend(ids)
            if self.eos_token_id is not None and ids[-1] != self.eos_token_id:
                stream.append(int(self.eos_token_id))
        rows = []
        b = self.block_size
        for start in range(0, len(stream), b):
            chunk = stream[start : start + b]
            n = len(chunk)
            if n < 2 and rows:  # a single leftover token carries no next-token target
                continue
            pad = b - n
            rows.append(
                (
                    chunk + [self.pad_token_id] * pad,
                    chunk + [IGNORE_INDEX] * pad,
                    [1] * n + [0] * pad,
                )
            )
        return rows

    def _pairs(
        self, tokenizer: Any, pairs: list[tuple[Any, Any]]
    ) -> list[tuple[list[int], list[int], list[int]]]:
        prompts = [p for p, _ in pairs]
        responses = [r for _, r in pairs]
        p_ids = self._encode(tokenizer, prompts, special=True)
        r_ids = self._encode(tokenizer, responses, special=False)
        rows = []
        b = self.block_size
        for p, r in zip(p_ids, r_ids, strict=True):
            r = list(r)
            if self.eos_token_id is not None:
                r.append(int(self.eos_token_id))
            if not r:
                continue
            r = r[:b]
            room = b - len(r)
            p = p[max(0, len(p) - room) :] if room > 0 else []
            ids = p + r
            n = len(ids)
            pad = b - n
            rows.append(
                (
                    ids + [self.pad_token_id] * pad,
                    [IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * pad,
                    [1] * n + [0] * pad,
                )
            )
        return rows

    # -- access --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }

    def order(self, epoch: int = 0, shuffle: bool = True) -> list[int]:
        """Row order for ``epoch``: a permutation seeded by ``(seed, epoch)``, or 0..n-1."""
        if not shuffle:
            return list(range(self.num_examples))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(epoch))
        return torch.randperm(self.num_examples, generator=gen).tolist()

    def collate(self, indices: Sequence[int], trim: bool = True) -> dict[str, torch.Tensor]:
        """Stack rows; ``trim`` drops trailing columns that are padding in every row."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        batch = {
            "input_ids": self.input_ids[idx],
            "attention_mask": self.attention_mask[idx],
            "labels": self.labels[idx],
        }
        if trim:
            width = int(batch["attention_mask"].sum(dim=1).max())
            width = max(width, 1)
            batch = {k: v[:, :width].contiguous() for k, v in batch.items()}
        return batch

    def batches(
        self, batch_size: int, epoch: int = 0, shuffle: bool = True, trim: bool = True
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of ``batch_size`` rows (the last may be smaller) in :meth:`order`."""
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        order = self.order(epoch, shuffle)
        for start in range(0, len(order), batch_size):
            yield self.collate(order[start : start + batch_size], trim=trim)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(self.num_examples / batch_size)


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvalResult:
    """Token-level evaluation: mean NLL (nats), perplexity, next-token accuracy, token count."""

    nll: float
    ppl: float
    accuracy: float
    tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {"nll": self.nll, "ppl": self.ppl, "accuracy": self.accuracy, "tokens": self.tokens}


def causal_lm_token_stats(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum of token NLL, number of correct argmax predictions, number of targets)``.

    Shifts so position ``i`` predicts ``labels[i + 1]``; ``-100`` targets are skipped. The NLL
    is computed in fp32 and keeps the graph (usable as a training loss).
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(shift_logits.device)
    flat_logits = shift_logits.reshape(-1, shift_logits.shape[-1]).float()
    flat_labels = shift_labels.reshape(-1)
    nll = torch.nn.functional.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    valid = flat_labels != IGNORE_INDEX
    with torch.no_grad():
        correct = (flat_logits.argmax(dim=-1) == flat_labels) & valid
    return nll, correct.sum(), valid.sum()


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def evaluate_nll(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Iterable[Any] | TokenizedDataset,
    block_size: int = 256,
    batch_size: int = 8,
) -> EvalResult:
    """Mean token NLL / perplexity / next-token accuracy over ``texts`` (same forms as
    :class:`TokenizedDataset`; pairs score only the response). Runs in eval mode under
    ``torch.no_grad`` and restores the model's previous train/eval mode."""
    from algorithms.core.modeling import disable_cpu_weight_repacking

    ds = (
        texts
        if isinstance(texts, TokenizedDataset)
        else TokenizedDataset(tokenizer, texts, block_size)
    )
    disable_cpu_weight_repacking(model)
    was_training = model.training
    device = _model_device(model)
    total_nll = 0.0
    total_correct = 0
    total = 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in ds.batches(batch_size, shuffle=False):
                out = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    use_cache=False,
                )
                nll, correct, n = causal_lm_token_stats(out.logits, batch["labels"])
                total_nll += float(nll)
                total_correct += int(correct)
                total += int(n)
    finally:
        model.train(was_training)
    if total == 0:
        raise DataError("evaluation data has no target tokens")
    mean = total_nll / total
    return EvalResult(
        nll=mean,
        ppl=math.exp(min(mean, 700.0)),
        accuracy=total_correct / total,
        tokens=total,
    )
