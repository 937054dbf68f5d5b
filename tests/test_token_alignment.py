"""FedMKT token alignment: marker normal form, MinED map vs brute force, cache, DTW, projection,
DualMinCE. Expected values in the hand-worked cases are derived in the comments."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from rapidfuzz.distance import Levenshtein

import algorithms.core.vocab_map as vocab_map_module
from algorithms.core.token_alignment import (
    SPACE,
    STYLES,
    AlignmentError,
    Vocabulary,
    align_sequences,
    align_tokens,
    build_vocab_map,
    cached_vocab_map,
    convert_token,
    dual_min_ce,
    dual_min_ce_batch,
    nearest_strings,
    normalize_token,
    project_topk,
    to_style,
    token_text,
    vocab_hash,
)

# --------------------------------------------------------------------------------------------
# brute-force reference (also timed by bench/mined.py): a Python loop over every pair


def brute_force_nearest(queries, candidates):
    """Each query's candidate by the key (distance, candidate string, position), over all pairs."""
    positions, distances = [], []
    for q in queries:
        best = min((Levenshtein.distance(q, c), c, p) for p, c in enumerate(candidates))
        positions.append(best[2])
        distances.append(best[0])
    return np.array(positions), np.array(distances)


def brute_force_candidates(dst: Vocabulary):
    """B's ordinary tokens as (normal form, is byte fallback, id): the order of the tie rule."""
    return [
        (dst.normal_form(j), dst.is_byte_fallback(j), j)
        for j, t in enumerate(dst.tokens)
        if t is not None and j not in dst.special_ids
    ]


def brute_force_token(src: Vocabulary, i: int, dst: Vocabulary, candidates) -> tuple[int, int]:
    """(B id, distance) of A's id ``i`` by the documented rule, without any pruning."""
    b_roles = dict(dst.roles)
    if src.tokens[i] is None:
        return b_roles.get("unk", 0), -1
    if i in src.special_ids:
        for role, j in src.roles:
            if j == i and role in b_roles:
                return b_roles[role], 0
    q = src.normal_form(i)
    d, _, _, j = min((Levenshtein.distance(q, s), s, fb, j) for s, fb, j in candidates)
    return j, d


def brute_force_vocab_map(src: Vocabulary, dst: Vocabulary):
    cands = brute_force_candidates(dst)
    pairs = [brute_force_token(src, i, dst, cands) for i in range(src.size)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def assert_same_as_brute_force(src: Vocabulary, dst: Vocabulary) -> None:
    vmap = build_vocab_map(src, dst, workers=1)
    ids, dist = brute_force_vocab_map(src, dst)
    assert vmap.ids.dtype == np.int64 and vmap.distances.dtype == np.int32
    np.testing.assert_array_equal(vmap.ids, ids)
    np.testing.assert_array_equal(vmap.distances, dist)


# --------------------------------------------------------------------------------------------
# marker normal form


@pytest.mark.parametrize(
    "token, style, normal",
    [
        ("Ġthe", "bytelevel", "▁the"),
        ("the", "bytelevel", "the"),
        ("ĠĠ", "bytelevel", "▁▁"),
        ("Ċ", "bytelevel", "\n"),  # byte 0x0A
        ("ĉ", "bytelevel", "\t"),
        ("Ã©", "bytelevel", "é"),  # bytes C3 A9
        ("Ã", "bytelevel", "<0xC3>"),  # a lone lead byte is not text
        ("ĠÃ", "bytelevel", "▁<0xC3>"),
        ("<s>", "bytelevel", "<s>"),  # all printable: decodes to itself
        ("漢", "bytelevel", "漢"),  # not in the byte alphabet (an added token): literal
        ("▁the", "metaspace", "▁the"),
        ("the", "metaspace", "the"),
        ("<0x41>", "metaspace", "A"),
        ("<0x0A>", "metaspace", "\n"),
        ("<0x20>", "metaspace", "▁"),
        ("<0xc3>", "metaspace", "<0xC3>"),
        ("<0x4>", "metaspace", "<0x4>"),  # not a byte token
        ("the", "wordpiece", "▁the"),  # no "##": a word start
        ("##ing", "wordpiece", "ing"),
        ("##", "wordpiece", ""),
        (".", "wordpiece", "▁."),
    ],
)
def test_normal_form_by_hand(token, style, normal):
    assert normalize_token(token, style) == normal


@pytest.mark.parametrize(
    "token, src, dst, expected",
    [
        ("Ġthe", "bytelevel", "metaspace", "▁the"),
        ("Ġthe", "bytelevel", "wordpiece", "the"),
        ("the", "bytelevel", "wordpiece", "##the"),
        ("##ing", "wordpiece", "bytelevel", "ing"),
        ("play", "wordpiece", "metaspace", "▁play"),
        ("▁", "metaspace", "bytelevel", "Ġ"),
        ("<0x0A>", "metaspace", "bytelevel", "Ċ"),
        ("<0xC3>", "metaspace", "bytelevel", "Ã"),
        ("Ã©", "bytelevel", "metaspace", "é"),
        ("▁é", "metaspace", "bytelevel", "ĠÃ©"),
    ],
)
def test_convert_token_by_hand(token, src, dst, expected):
    assert convert_token(token, src, dst) == expected


def test_token_text_strips_the_word_marker():
    assert token_text("Ġcat", "bytelevel") == "cat"
    assert token_text("▁cat", "metaspace") == "cat"
    assert token_text("cat", "wordpiece") == "cat"
    assert token_text("##cat", "wordpiece") == "cat"
    assert token_text("▁▁", "metaspace") == SPACE


def test_unknown_style_is_refused():
    with pytest.raises(AlignmentError, match="unknown tokenizer style"):
        normalize_token("x", "sentencepiece")


# --------------------------------------------------------------------------------------------
# trained tokenizers of the three styles

UNICODE_LINES = [
    "Café naïve résumé, déjà vu: the señor's piñata — 漢字 and かな; emoji 🙂 too.",
    "Über Straße und Größe: Ölfässer, Ärger, Übung; ½ + ¼ = ¾ °C.",
] * 12


@pytest.fixture(scope="module")
def trained():
    from algorithms.core.tokenizer import train_tokenizer
    from algorithms.zoo.datasets import domain_split, general_text

    texts = general_text("train", source="fortunes")[:400] + domain_split("science", "public")
    texts += UNICODE_LINES
    return {
        (style, size): Vocabulary.from_tokenizer(train_tokenizer(texts, size, style=style))
        for style in STYLES
        for size in (450, 650)
    }


@pytest.mark.parametrize("style", STYLES)
def test_normal_form_round_trips_every_trained_token(trained, style):
    vocab = trained[(style, 650)]
    for i, token in enumerate(vocab.tokens):
        if i in vocab.special_ids or vocab.is_byte_fallback(i):
            continue
        assert to_style(normalize_token(token, style), style) == token


@pytest.mark.parametrize("src_style, dst_style", list(itertools.product(STYLES, STYLES)))
def test_trained_maps_equal_brute_force_both_directions(trained, src_style, dst_style):
    small, large = trained[(src_style, 450)], trained[(dst_style, 650)]
    assert_same_as_brute_force(small, large)
    assert_same_as_brute_force(large, small)


def test_trained_map_finds_exact_matches_across_conventions(trained):
    gpt2, llama = trained[("bytelevel", 650)], trained[("metaspace", 650)]
    vmap = build_vocab_map(gpt2, llama, workers=1)
    to_b = llama.token_to_id
    the = gpt2.token_to_id["Ġthe"]
    assert vmap.ids[the] == to_b["▁the"] and vmap.distances[the] == 0
    for role in ("bos", "eos", "pad", "unk"):
        assert vmap.ids[dict(gpt2.roles)[role]] == dict(llama.roles)[role]
    assert vmap.exact_fraction > 0.5


# --------------------------------------------------------------------------------------------
# MinED kernel and rule on random and hand-made inputs


@pytest.mark.parametrize("seed", range(4))
def test_nearest_strings_equal_brute_force_random(seed):
    rng = random.Random(seed)
    alphabet = "ab▁é漢"  # few letters: many ties

    def word(lo, hi):
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))

    candidates = [word(0, 6) for _ in range(300)] + [word(15, 40) for _ in range(10)]
    candidates += rng.sample(candidates, 20)  # duplicates: the first position wins
    queries = [word(0, 8) for _ in range(200)] + [word(20, 60) for _ in range(10)] + [""]
    pos, dist = nearest_strings(queries, candidates, workers=1)
    ref_pos, ref_dist = brute_force_nearest(queries, candidates)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(dist, ref_dist)


def test_tie_rule_by_hand():
    # "hat", "bat", "cab" are all one edit from "cat": the smallest string, "bat", wins, and of
    # its two copies the first position (1)
    pos, dist = nearest_strings(["cat"], ["hat", "bat", "cab", "bat", "dog"], workers=1)
    assert (pos.tolist(), dist.tolist()) == ([1], [1])
    # two edits (found by the banded search): "abxy" < "xbcx"; "zzzz" is four away
    pos, dist = nearest_strings(["abcd"], ["xbcx", "zzzz", "abxy"], workers=1)
    assert (pos.tolist(), dist.tolist()) == ([2], [2])
    # an exact match beats everything; nothing to match at all is an error
    assert nearest_strings(["ab"], ["a", "ab"], workers=1)[0].tolist() == [1]
    with pytest.raises(AlignmentError):
        nearest_strings(["ab"], [], workers=1)


def test_regular_token_beats_byte_fallback_of_same_text():
    specials = {"<s>": 0, "</s>": 1, "<unk>": 2}
    roles = {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}
    llama = Vocabulary.from_dict({**specials, "<0x41>": 3, "A": 4, "▁A": 5}, "metaspace", roles)
    gpt2 = Vocabulary.from_dict({**specials, "A": 3, "ĠA": 4, "B": 5}, "bytelevel", roles)
    vmap = build_vocab_map(gpt2, llama, workers=1)
    # "A" -> regular "A" (id 4) although "<0x41>" (id 3) has the same text and a smaller id
    assert vmap.ids.tolist() == [0, 1, 2, 4, 5, 4] and vmap.distances.tolist() == [0, 0, 0, 0, 0, 1]
    back = build_vocab_map(llama, gpt2, workers=1)
    assert back.ids.tolist() == [0, 1, 2, 3, 3, 4]  # the byte token reads as "A" too


def test_specials_map_by_role_and_are_never_targets():
    a = Vocabulary.from_dict(
        {"</s>": 0, "<pad>": 1, "[MASK]": 2, "▁a": 3, "▁b": 4, "<mask>": 6},
        "metaspace",
        roles={"eos": "</s>", "pad": "<pad>"},
        specials=["[MASK]"],
    )
    b = Vocabulary.from_dict(
        {"<|endoftext|>": 0, "Ġa": 1, "Ġb": 2, "<pad>": 3, "[MASK]": 4},
        "bytelevel",
        roles={"eos": "<|endoftext|>", "bos": "<|endoftext|>", "unk": "<|endoftext|>"},
    )
    vmap = build_vocab_map(a, b, workers=1)
    # eos -> eos; pad has no counterpart: matched literally against B's ordinary tokens, where
    # the ordinary "<pad>" (id 3) is; A's unnamed special "[MASK]" likewise finds "[MASK]";
    # id 5 has no token: B's unk, distance -1; "<mask>" is ordinary in A, 3 edits from "<pad>"
    assert vmap.ids.tolist() == [0, 3, 4, 1, 2, 0, 3]
    assert vmap.distances.tolist() == [0, 0, 0, 0, 0, -1, 3]
    assert_same_as_brute_force(a, b)
    # B's specials are never the target of an ordinary token
    c = Vocabulary.from_dict({"<s>": 0, "▁x": 1, "<s": 2}, "metaspace", roles={"bos": "<s>"})
    d = Vocabulary.from_dict({"<s>": 0, "Ġy": 1}, "bytelevel", roles={"eos": "<s>"})
    assert build_vocab_map(c, d, workers=1).ids.tolist() == [1, 1, 1]


def _random_vocab(rng: random.Random, n: int, style: str) -> Vocabulary:
    alphabet = "abcé▁Ġ#漢"
    marker = {"bytelevel": "Ġ", "metaspace": "▁", "wordpiece": "##"}[style]
    tokens = {"<s>", "</s>", "<unk>", ""}
    if style == "metaspace":
        tokens.update(f"<0x{b:02X}>" for b in rng.sample(range(256), 20))
    while len(tokens) < n:
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
        tokens.add(marker + s if rng.random() < 0.5 else s)
    ids = rng.sample(range(n + n // 10), n)  # leaves holes
    vocab = dict(zip(sorted(tokens), ids, strict=True))
    roles = {"eos": "</s>", "unk": "<unk>"} if rng.random() < 0.5 else {"bos": "<s>"}
    return Vocabulary.from_dict(vocab, style, roles, specials=["<s>", "</s>"])


@pytest.mark.parametrize("seed", range(3))
def test_random_vocabularies_equal_brute_force(seed):
    rng = random.Random(100 + seed)
    for src_style, dst_style in [("bytelevel", "metaspace"), ("wordpiece", "bytelevel")]:
        a, b = _random_vocab(rng, 200, src_style), _random_vocab(rng, 300, dst_style)
        assert_same_as_brute_force(a, b)
        assert_same_as_brute_force(b, a)


# --------------------------------------------------------------------------------------------
# vocabulary hash and disk cache


def test_vocab_hash_is_order_free_and_content_sensitive(trained):
    tok_vocab = {"a": 0, "b": 1, "c": 2}
    assert vocab_hash(tok_vocab) == vocab_hash({"c": 2, "a": 0, "b": 1})
    assert vocab_hash(tok_vocab) != vocab_hash({"a": 0, "b": 2, "c": 1})
    vocab = trained[("metaspace", 450)]
    assert vocab_hash(vocab) == vocab_hash(vocab.token_to_id)
    assert len(vocab_hash(vocab)) == 64


def test_cache_hits_and_rebuilds_a_corrupt_file(trained, tmp_path, monkeypatch):
    a, b = trained[("bytelevel", 450)], trained[("wordpiece", 450)]
    first = cached_vocab_map(a, b, cache_dir=tmp_path, workers=1)
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"{first.key}.safetensors"]  # no temp file left behind

    calls = []
    real_build = vocab_map_module.build_vocab_map

    def counting_build(*args, **kw):
        calls.append(1)
        return real_build(*args, **kw)

    monkeypatch.setattr(vocab_map_module, "build_vocab_map", counting_build)
    hit = cached_vocab_map(a, b, cache_dir=tmp_path, workers=1)
    assert calls == []  # served from disk
    np.testing.assert_array_equal(hit.ids, first.ids)
    np.testing.assert_array_equal(hit.distances, first.distances)

    path = files[0]
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x01  # flip one bit of the data: the checksum no longer matches
    path.write_bytes(bytes(blob))
    rebuilt = cached_vocab_map(a, b, cache_dir=tmp_path, workers=1)
    assert calls == [1]
    np.testing.assert_array_equal(rebuilt.ids, first.ids)
    cached_vocab_map(a, b, cache_dir=tmp_path, workers=1)
    assert calls == [1]  # the rewritten file is trusted again

    path.write_bytes(b"not a safetensors file")
    np.testing.assert_array_equal(
        cached_vocab_map(a, b, cache_dir=tmp_path, workers=1).ids, first.ids
    )
    assert calls == [1, 1]

    # another direction is another key
    other = cached_vocab_map(b, a, cache_dir=tmp_path, workers=1)
    assert other.key != first.key and len(other) == b.size
    assert len(list(tmp_path.iterdir())) == 2


def test_cache_write_failure_is_not_fatal(trained, tmp_path, caplog):
    a, b = trained[("metaspace", 450)], trained[("bytelevel", 450)]
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    vmap = cached_vocab_map(a, b, cache_dir=blocker / "maps", workers=1)
    assert len(vmap) == a.size and "could not cache" in caplog.text


def test_vocabulary_validation():
    class Tok:  # anything with get_vocab() hashes like its map
        def get_vocab(self):
            return {"a": 0, "b": 1}

    assert vocab_hash(Tok()) == vocab_hash({"b": 1, "a": 0})
    with pytest.raises(AlignmentError, match="cannot hash"):
        vocab_hash(42)
    with pytest.raises(AlignmentError, match="not in the vocabulary"):
        Vocabulary.from_dict({"a": 0}, "metaspace", roles={"eos": "</s>"})
    with pytest.raises(AlignmentError, match="distinct"):
        Vocabulary.from_dict({"a": 0, "b": 0}, "metaspace")
    with pytest.raises(AlignmentError, match="marker style"):
        Vocabulary.from_dict({"a": 0, "b": 1})
    assert Vocabulary.from_dict({"##a": 0, "b": 1}).style == "wordpiece"
    with pytest.raises(AlignmentError, match="twice"):
        Vocabulary(("a", "b"), "metaspace", roles=(("eos", 0), ("eos", 1)))
    v = Vocabulary(("a", "b", "c"), "metaspace", roles=(("unk", 2), ("eos", 0)))
    assert v.roles == (("eos", 0), ("unk", 2)) and v.special_ids == {0, 2}
    only_specials = Vocabulary.from_dict({"<s>": 0}, "metaspace", roles={"bos": "<s>"})
    with pytest.raises(AlignmentError, match="no ordinary tokens"):
        build_vocab_map(v, only_specials, workers=1)


# --------------------------------------------------------------------------------------------
# DTW


def test_dtw_identical_sequences_align_diagonally():
    al = align_sequences(["a", "bb", "c"], ["a", "bb", "c"])
    assert al.path.tolist() == [[0, 0], [1, 1], [2, 2]]
    assert al.base_to_blend.tolist() == [0, 1, 2] and al.cost == 0


def test_dtw_split_word_by_hand():
    # costs (Levenshtein)     the  c  at  sat      accumulated      the  c  at  sat
    #                  the  [  0,  3,  3,  3 ]                the [ 0,  3,  6,  9 ]
    #                  cat  [  3,  2,  1,  1 ]                cat [ 3,  2,  3,  4 ]
    #                  sat  [  3,  3,  1,  0 ]                sat [ 6,  5,  3,  3 ]
    # backtrace from (2,3): diag 3, up 4, left 3 -> diagonal wins the tie -> (1,2);
    # from (1,2): diag 3, up 6, left 2 -> (1,1); then diagonal to (0,0).
    al = align_sequences(["the", "cat", "sat"], ["the", "c", "at", "sat"])
    assert al.path.tolist() == [[0, 0], [1, 1], [1, 2], [2, 3]]
    assert al.cost == 3
    assert al.base_to_blend.tolist() == [0, -1, 3]  # "cat" is one-to-many: no match


def test_dtw_tie_rule_by_hand():
    # costs [[1,0],[0,1]], accumulated [[1,1],[1,2]]: at (1,1) diag, up and left all cost 1;
    # the diagonal is preferred
    al = align_sequences(["a", "b"], ["b", "a"])
    assert al.path.tolist() == [[0, 0], [1, 1]] and al.cost == 2
    # base a b a, blend b a b: costs [[1,0,1],[0,1,0],[1,0,1]], accumulated
    # [[1,1,2],[1,2,1],[2,1,2]]; at (2,2): diag 2, up 1, left 1 -> up (1,2) before left (2,1);
    # at (1,2): diag 1, up 2, left 2 -> (0,1); then left to (0,0)
    al = align_sequences(["a", "b", "a"], ["b", "a", "b"])
    assert al.path.tolist() == [[0, 0], [0, 1], [1, 2], [2, 2]]
    assert al.base_to_blend.tolist() == [-1, -1, -1] and al.cost == 2


def test_dtw_edges_and_raw_tokens():
    assert align_sequences([], ["a"]).base_to_blend.tolist() == []
    al = align_sequences(["a", "b"], [])
    assert al.base_to_blend.tolist() == [-1, -1] and al.path.shape == (0, 2)
    al = align_tokens(["▁the", "▁cat"], "metaspace", ["Ġthe", "Ġc", "at"], "bytelevel")
    assert al.path.tolist() == [[0, 0], [1, 1], [1, 2]]
    assert al.base_to_blend.tolist() == [0, -1]


def test_dtw_matches_a_plain_dp_on_random_sequences():
    rng = random.Random(7)
    for _ in range(20):
        base = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 3))) for _ in range(12)]
        blend = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 3))) for _ in range(9)]
        acc = np.zeros((len(base), len(blend)), dtype=np.int64)
        for i, j in itertools.product(range(len(base)), range(len(blend))):
            prev = [acc[i - 1, j - 1] if i and j else None, acc[i - 1, j] if i else None]
            prev += [acc[i, j - 1] if j else None]
            acc[i, j] = Levenshtein.distance(base[i], blend[j]) + min(
                [p for p in prev if p is not None], default=0
            )
        al = align_sequences(base, blend)
        assert al.cost == acc[-1, -1]
        steps = np.diff(al.path, axis=0)
        assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(axis=1) >= 1).all()
        cost = sum(Levenshtein.distance(base[i], blend[j]) for i, j in al.path)
        assert cost == al.cost


# --------------------------------------------------------------------------------------------
# top-k projection


def test_projection_keeps_highest_duplicate_and_falls_back_to_one_hot():
    base_to_blend = np.array([0, -1, 2])
    base_ids = np.array([5, 6, 7])
    values = np.array([[3.0, 2.0, 1.0], [9.0, 8.0, 7.0], [4.0, 3.0, -np.inf]], dtype=np.float16)
    ids = np.array([[0, 1, 2], [0, 1, 2], [3, 2, 1]])
    vmap = np.array([10, 10, 11, 12])  # blend ids 0 and 1 both land on base id 10
    out = project_topk(base_to_blend, base_ids, values, ids, vmap)
    # row 0: 10 keeps 3.0 (not 2.0), then 11; row 1: one-hot on its own token 6;
    # row 2: -inf entries are absent
    assert out.ids.tolist() == [[10, 11, 0], [6, 0, 0], [12, 11, 0]]
    np.testing.assert_array_equal(
        out.values, np.array([[3, 1, -np.inf], [0, -np.inf, -np.inf], [4, 3, -np.inf]], np.float32)
    )
    assert out.matched.tolist() == [True, False, True]
    assert out.mask.tolist() == [[True, True, False], [True, False, False], [True, True, False]]


def test_projection_ties_sorted_by_id_and_empty_rows_fall_back():
    out = project_topk(
        np.array([0, 1]),
        np.array([3, 4]),
        np.array([[1.0, 1.0], [-np.inf, -np.inf]]),
        np.array([[1, 0], [0, 1]]),
        np.array([8, 2]),
    )
    assert out.ids.tolist() == [[2, 8], [4, 0]]  # equal logits: smaller id first
    assert out.matched.tolist() == [True, False]


def test_projection_rejects_bad_input():
    ok = dict(
        base_to_blend=np.array([0]),
        base_ids=np.array([1]),
        blend_values=np.array([[1.0]]),
        blend_ids=np.array([[0]]),
        vocab_map=np.array([0]),
    )
    project_topk(**ok)
    for change in (
        {"blend_ids": np.array([[1]])},  # outside the map
        {"base_to_blend": np.array([1])},  # outside the blend rows
        {"blend_values": np.array([[np.nan]])},
        {"blend_values": np.array([1.0])},
        {"base_ids": np.array([1, 2])},
    ):
        with pytest.raises(AlignmentError):
            project_topk(**{**ok, **change})


# --------------------------------------------------------------------------------------------
# DualMinCE


@pytest.mark.parametrize(
    "teachers, own, expected",
    [
        ([2.0, 1.0, 1.5], 1.2, 1),  # the best teacher is better than the receiver
        ([2.0, 1.3], 1.2, None),  # every teacher is worse: keep the own distribution
        ([1.2], 1.2, None),  # a tie with the receiver keeps its own
        ([0.9, 0.7, 0.7], 1.0, 1),  # a tie between teachers: the lowest index
        ([float("nan"), 0.5], 1.0, 1),  # NaN is never chosen
        ([float("nan")], 1.0, None),
        ([], 1.0, None),
        ([3.0], float("nan"), 0),  # an unknown own CE counts as +inf
    ],
)
def test_dual_min_ce_by_hand(teachers, own, expected):
    assert dual_min_ce(teachers, own) == expected


def test_dual_min_ce_batch_agrees_with_scalar():
    rng = np.random.default_rng(3)
    ces = rng.integers(0, 4, size=(3, 50)).astype(float)  # small integers: many ties
    ces[0, :5] = np.nan
    own = rng.integers(0, 4, size=50).astype(float)
    got = dual_min_ce_batch(ces, own)
    want = [dual_min_ce(list(ces[:, s]), own[s]) for s in range(50)]
    assert got.tolist() == [-1 if w is None else w for w in want]
    assert dual_min_ce_batch(np.zeros((0, 2)), np.ones(2)).tolist() == [-1, -1]
    with pytest.raises(AlignmentError):
        dual_min_ce_batch(np.zeros((2, 3)), np.zeros(2))
