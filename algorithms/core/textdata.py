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

  A pair dict may also carry ``"system"`` (a system prompt), and its ``"prompt"`` may be a
  conversation (a list of ``{"role": "system"|"user"|"assistant", "content": ...}`` messages
  ending with a user turn); ``{"messages": [...]}`` (the chat form many instruction sets use)
  is split into such a pair by :func:`split_conversation`: the last assistant turn is the
  response, everything before it the prompt.

Chat templates (``chat_template="auto"``, the default): when the tokenizer has one
(``tokenizer.chat_template``), a pair is rendered with it: the prompt is the conversation
(system, user, ...) rendered with ``add_generation_prompt=True``, and the response is what the
rendering *with* the assistant turn adds after it (the answer and whatever end-of-turn marker
the template writes; no ``eos`` is appended). Loss covers those tokens only. A template whose
prompt rendering is not a prefix of the full rendering cannot be split that way: such pairs
fall back to the plain form below, with a warning. ``chat_template="never"`` (on the dataset,
or ``"chat_template": "never"`` in a pair dict) keeps the plain form: ``prompt + response +
eos``; a system prompt or a conversation is then written as ``"System: ...\nUser: ...\n
Assistant:"`` lines. Without a chat template the plain form is used and plain string pairs are
tokenized exactly as before.

Labels use the Hugging Face convention: ``labels[i]`` is the token at position ``i`` and the
model predicts it from positions ``< i`` (the shift happens in the loss).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from algorithms.core.errors import DataError

__all__ = [
    "CHAT_TEMPLATE_MODES",
    "IGNORE_INDEX",
    "EvalResult",
    "TokenizedDataset",
    "causal_lm_token_stats",
    "evaluate_nll",
    "split_conversation",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: ``"auto"``: use the tokenizer's chat template for pairs when it has one; ``"never"``: don't.
CHAT_TEMPLATE_MODES = ("auto", "never")
_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class _Pair:
    prompt: str | tuple[tuple[str, str], ...]  # a string, or (role, content) messages
    response: Any
    system: str | None = None
    chat_template: str = "auto"


def _check_mode(mode: Any, where: str) -> str:
    if mode not in CHAT_TEMPLATE_MODES:
        raise DataError(f"{where} must be one of {list(CHAT_TEMPLATE_MODES)}, got {mode!r}")
    return mode


def _messages(messages: Any) -> list[tuple[str, str]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise DataError(
            "a conversation must be a non-empty list of {'role': ..., 'content': ...} messages, "
            f"got {type(messages).__name__}"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            got = sorted(m) if isinstance(m, Mapping) else type(m).__name__
            raise DataError(f"message {i}: expected a dict with 'role' and 'content', got {got}")
        role, content = m["role"], m["content"]
        if role not in _ROLES:
            raise DataError(f"message {i}: role {role!r} is not one of {list(_ROLES)}")
        if not isinstance(content, str):
            raise DataError(
                f"message {i} ({role}): content must be a string, got {type(content).__name__}"
            )
        out.append((role, content))
    return out


def split_conversation(messages: Any) -> dict[str, Any]:
    """A chat conversation as a pair dict: the last assistant turn is the ``"response"``,
    everything before it the ``"prompt"``; a leading system message becomes ``"system"``.

    ``"prompt"`` is the user's text when a single user turn precedes the answer, else the
    list of messages. Raises :class:`DataError` for malformed messages, a conversation without
    an assistant turn (or with turns after the last one) or without a user turn before it.
    """
    msgs = _messages(messages)
    last = max((i for i, (role, _) in enumerate(msgs) if role == "assistant"), default=None)
    if last is None:
        raise DataError("conversation has no assistant turn to learn from")
    if last != len(msgs) - 1:
        raise DataError(
            f"conversation goes on after its last assistant turn (message {last} of "
            f"{len(msgs)}); end it with the assistant turn to learn"
        )
    prompt = msgs[:last]
    system = None
    if prompt and prompt[0][0] == "system":
        system, prompt = prompt[0][1], prompt[1:]
    if not any(role == "user" for role, _ in prompt):
        raise DataError("conversation has no user turn before its last assistant turn")
    out: dict[str, Any] = {
        "prompt": (
            prompt[0][1] if len(prompt) == 1 else [{"role": r, "content": c} for r, c in prompt]
        ),
        "response": msgs[last][1],
    }
    if system is not None:
        out["system"] = system
    return out


def _pair_from_dict(item: Mapping) -> _Pair:
    prompt = item["prompt"]
    system = item.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"'system' must be a string, got {type(system).__name__}")
    mode = _check_mode(item.get("chat_template", "auto"), "a pair's 'chat_template'")
    if not isinstance(prompt, str):
        if not isinstance(prompt, (list, tuple)):
            raise DataError(
                f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
            )
        msgs = _messages(prompt)
        if msgs[-1][0] != "user":
            raise DataError("a conversation prompt must end with a user turn")
        if system is not None and msgs[0][0] == "system":
            raise DataError("pair has both 'system' and a system message in its prompt")
        if msgs[0][0] == "system":
            system, msgs = msgs[0][1], msgs[1:]
        prompt = msgs[0][1] if len(msgs) == 1 else tuple(msgs)
    return _Pair(prompt, item["response"], system, mode)


def _classify(item: Any) -> tuple[str, Any]:
    if isinstance(item, str):
        return "text", item
    if isinstance(item, Mapping):
        if "prompt" in item or "response" in item:
            if "prompt" not in item or "response" not in item:
                raise DataError(
                    f"pair dict needs both 'prompt' and 'response' keys, got {sorted(item)}"
                )
            return "pairs", _pair_from_dict(item)
        if "messages" in item:
            pair = split_conversation(item["messages"])
            if "chat_template" in item:
                pair["chat_template"] = item["chat_template"]
            return "pairs", _pair_from_dict(pair)
        if "text" in item:
            return "text", item["text"]
        raise DataError(
            f"dict example needs 'text', 'prompt'+'response' or 'messages' keys, got {sorted(item)}"
        )
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return "pairs", _pair_from_dict({"prompt": item[0], "response": item[1]})
    raise DataError(
        f"unsupported example of type {type(item).__name__}; use str, (prompt, response), "
        "or a dict with 'text', 'prompt'/'response' or 'messages'"
    )


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and callable(
        getattr(tokenizer, "apply_chat_template", None)
    )


def _conversation(pair: _Pair) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": pair.system}] if pair.system is not None else []
    if isinstance(pair.prompt, str):
        return msgs + [{"role": "user", "content": pair.prompt}]
    return msgs + [{"role": r, "content": c} for r, c in pair.prompt]


def _plain_prompt(pair: _Pair) -> Any:
    """The prompt text without a chat template: the prompt itself for a plain pair, else one
    ``"Role: content"`` line per message and a closing ``"Assistant:"``."""
    if pair.system is None and not isinstance(pair.prompt, tuple):
        return pair.prompt
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in _conversation(pair)]
    return "\n".join(lines + ["Assistant:"])


class TokenizedDataset(torch.utils.data.Dataset):
    """Token blocks of one client's private data.

    Each row is a dict of 1-D ``LongTensor`` of length ``block_size``: ``input_ids``,
    ``attention_mask`` (0 on padding) and ``labels`` (-100 where no loss). Iteration order for
    training comes from :meth:`order` / :meth:`batches`, deterministic in ``(seed, epoch)``.

    ``num_examples``: rows (packed blocks or pairs). ``num_tokens``: real (non-pad) tokens.
    ``num_loss_tokens``: tokens that carry loss (label != -100). ``chat_template``: ``"auto"``
    renders pairs with the tokenizer's chat template when it has one, ``"never"`` keeps plain
    ``prompt + response + eos`` (see the module docstring); ``num_templated_pairs`` counts the
    pairs rendered with the template.
    """

    def __init__(
        self,
        tokenizer: Any,
        data: Iterable[Any],
        block_size: int,
        *,
        seed: int = 0,
        add_eos: bool = True,
        chat_template: str = "auto",
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise DataError(f"block_size must be an integer >= 2, got {block_size!r}")
        self.chat_template = _check_mode(chat_template, "chat_template")
        self.num_templated_pairs = 0
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
        self, tokenizer: Any, pairs: list[_Pair]
    ) -> list[tuple[list[int], list[int], list[int]]]:
        # per pair: (prompt ids, response ids); the template path gives both from one rendering
        split: list[tuple[list[int], list[int]] | None] = [None] * len(pairs)
        plain = list(range(len(pairs)))
        if self.chat_template == "auto" and _has_chat_template(tokenizer):
            wanted = [i for i, pair in enumerate(pairs) if pair.chat_template == "auto"]
            done = self._templated(tokenizer, [pairs[i] for i in wanted], wanted)
            for i, ids in zip(wanted, done, strict=True):
                split[i] = ids
            plain = [i for i in plain if split[i] is None]
            self.num_templated_pairs = len(pairs) - len(plain)
            if len(wanted) > self.num_templated_pairs:
                logger.warning(
                    "the tokenizer's chat template is not prefix-stable for %d of %d pairs (the "
                    "prompt's rendering is not the start of the rendering with the answer); "
                    "those pairs are tokenized as plain prompt + response + eos",
                    len(wanted) - self.num_templated_pairs,
                    len(wanted),
                )
        if plain:
            prompts = [_plain_prompt(pairs[i]) for i in plain]
            p_ids = self._encode(tokenizer, prompts, special=True)
            r_ids = self._encode(tokenizer, [pairs[i].response for i in plain], special=False)
            for i, p, r in zip(plain, p_ids, r_ids, strict=True):
                r = list(r)
                if self.eos_token_id is not None:
                    r.append(int(self.eos_token_id))
                split[i] = (list(p), r)
        rows = []
        b = self.block_size
        for ids_pair in split:
            assert ids_pair is not None
            p, r = ids_pair
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

    def _templated(
        self, tokenizer: Any, pairs: list[_Pair], numbers: list[int]
    ) -> list[tuple[list[int], list[int]] | None]:
        """(prompt ids, response ids) per pair from the chat template; None where the prompt's
        rendering is not a prefix of the full one (the caller falls back to plain).
        ``numbers``: the pairs' positions in the data, for error messages."""
        prompts: list[str] = []
        fulls: list[str] = []
        for n, pair in zip(numbers, pairs, strict=True):
            if not isinstance(pair.response, str):
                raise DataError(f"pair {n}: expected text, got {type(pair.response).__name__}")
            msgs = _conversation(pair)
            answer = {"role": "assistant", "content": pair.response}
            try:
                p_text = tokenizer.apply_chat_template(
                    msgs, tokenize=False, add_generation_prompt=True
                )
                f_text = tokenizer.apply_chat_template(msgs + [answer], tokenize=False)
            except Exception as e:  # template errors (roles it refuses, ...) name the pair
                raise DataError(
                    f"pair {n}: the tokenizer's chat template failed ({type(e).__name__}: {e}); "
                    "fix the data or use chat_template='never'"
                ) from e
            if not (isinstance(p_text, str) and isinstance(f_text, str)):
                raise DataError("the tokenizer's apply_chat_template did not return text")
            prompts.append(p_text)
            fulls.append(f_text)
        out: list[tuple[list[int], list[int]] | None] = []
        stable = [i for i, (p, f) in enumerate(zip(prompts, fulls, strict=True)) if f.startswith(p)]
        p_ids = self._encode(tokenizer, [prompts[i] for i in stable], special=False)
        f_ids = self._encode(tokenizer, [fulls[i] for i in stable], special=False)
        by_index = dict(zip(stable, zip(p_ids, f_ids, strict=True), strict=True))
        for i in range(len(pairs)):
            if i not in by_index:
                out.append(None)
                continue
            p, f = by_index[i]
            # the answer starts where the two token sequences part (normally at len(p); a merge
            # across the boundary moves it left, and those tokens then carry loss)
            k = 0
            while k < min(len(p), len(f)) and p[k] == f[k]:
                k += 1
            out.append((f[:k], f[k:]))
        return out

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
