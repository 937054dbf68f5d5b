"""FedMKT token alignment: one import for the kernels the algorithm halves use.

The code lives in three modules small enough to read in one sitting:

- :mod:`algorithms.core.token_markers`: marker conventions (GPT-2 ``"Ġ"``, SentencePiece
  ``"▁"`` with ``<0x..>`` byte fallback, WordPiece ``"##"``), the common normal form and
  :class:`Vocabulary`;
- :mod:`algorithms.core.vocab_map`: the MinED vocabulary map (tie rule in its docstring) and
  its disk cache;
- :mod:`algorithms.core.seq_align`: DTW sequence alignment, top-k projection into the base
  vocabulary, DualMinCE selection.

Typical use on the receiving side (base = receiver, blend = teacher)::

    vmap = cached_vocab_map(teacher_tok, own_tok)             # teacher ids -> own ids
    al = align_tokens(own_tokens, own_style, teacher_tokens, teacher_style)
    target = project_topk(al.base_to_blend, own_ids, t_values, t_ids, vmap)
"""

from __future__ import annotations

from algorithms.core.seq_align import (
    Alignment,
    ProjectedTopK,
    align_sequences,
    align_tokens,
    dual_min_ce,
    dual_min_ce_batch,
    project_topk,
)
from algorithms.core.token_markers import (
    ROLES,
    SPACE,
    STYLES,
    AlignmentError,
    Vocabulary,
    as_vocabulary,
    convert_token,
    normalize_token,
    to_style,
    token_text,
    vocab_hash,
)
from algorithms.core.vocab_map import (
    ALGORITHM_VERSION,
    VocabMap,
    build_vocab_map,
    cached_vocab_map,
    default_cache_dir,
    map_key,
    nearest_strings,
)

__all__ = [
    "ALGORITHM_VERSION",
    "ROLES",
    "SPACE",
    "STYLES",
    "Alignment",
    "AlignmentError",
    "ProjectedTopK",
    "VocabMap",
    "Vocabulary",
    "align_sequences",
    "align_tokens",
    "as_vocabulary",
    "build_vocab_map",
    "cached_vocab_map",
    "convert_token",
    "default_cache_dir",
    "dual_min_ce",
    "dual_min_ce_batch",
    "map_key",
    "nearest_strings",
    "normalize_token",
    "project_topk",
    "to_style",
    "token_text",
    "vocab_hash",
]
