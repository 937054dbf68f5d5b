"""Loss and target builders against values worked out by hand (in the comments), so a wrong
formula fails here and not only as a worse benchmark: FedMKT's top-k KD (renormalised,
tail-aware, KL, temperature), its dataset and KD term, the DTW agreement rule on a crafted
pair of tokenisations, DualMinCE across two tokenizers; the shared soft-target KD and the
proxy-tuning arithmetic on a 3-token vocabulary."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from algorithms.core.kd import kd_loss, proxy_logits, task_loss
from algorithms.core.token_alignment import Vocabulary, build_vocab_map, dual_min_ce_batch
from algorithms.fedmkt.targets import (
    AlignCounter,
    TargetDataset,
    aligned_targets,
    kd_term,
    tokens_agree,
    topk_kd_loss,
)

LN2 = math.log(2.0)
NEG = float("-inf")


# -- FedMKT's top-k KD -----------------------------------------------------------------------
def _one_position():
    """Student logits [ln 1, ln 2, ln 1]: q = [1/4, 1/2, 1/4]. The teacher sent its top-2 as
    full-vocabulary log-probabilities: p(1) = 0.6, p(0) = 0.2 (p(2) = 0.2 was not sent)."""
    logits = torch.tensor([[[0.0, LN2, 0.0]]])
    values = torch.tensor([[[math.log(0.6), math.log(0.2)]]])
    ids = torch.tensor([[[1, 0]]])
    return logits, values, ids, torch.ones(1, 1)


@pytest.mark.parametrize(
    "kind, tail, want",
    [
        # renormalised over the 2 sent ids: p' = [3/4, 1/4] on ids [1, 0]
        # CE = -(3/4 ln 1/2 + 1/4 ln 1/4) = 3/4 ln 2 + 1/2 ln 2 = 1.25 ln 2
        ("ce", False, 1.25 * LN2),
        # KL = CE - H(p') = 1.25 ln 2 + 3/4 ln 3/4 + 1/4 ln 1/4
        ("kl", False, 1.25 * LN2 + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)),
        # tail-aware: p = [0.6, 0.2] as sent + the unsent 0.2 against the student's unsent 1/4
        # CE = -(0.6 ln 1/2 + 0.2 ln 1/4 + 0.2 ln 1/4) = 0.6 ln 2 + 0.8 ln 2 = 1.4 ln 2
        ("ce", True, 1.4 * LN2),
        # KL = 0.6 ln(0.6 / 0.5) + 0.2 ln(0.2 / 0.25) + 0.2 ln(0.2 / 0.25)
        ("kl", True, 0.6 * math.log(1.2) + 0.4 * math.log(0.8)),
    ],
)
def test_topk_kd_loss_at_k2(kind, tail, want):
    logits, values, ids, mask = _one_position()
    got = topk_kd_loss(logits, values, ids, mask, kind=kind, tail=tail)
    assert float(got) == pytest.approx(want, abs=1e-6)


def test_topk_kd_loss_with_temperature_is_softened_and_scaled():
    """T = 2: teacher softmax(ln p / 2) over the sent ids is proportional to sqrt(p):
    [sqrt .6, sqrt .2] / (sqrt .6 + sqrt .2); the student's softmax(z / 2) is proportional to
    [1, sqrt 2, 1]; the loss is the CE between them times T^2 = 4."""
    logits, values, ids, mask = _one_position()
    a, b = math.sqrt(0.6), math.sqrt(0.2)
    p1, p0 = a / (a + b), b / (a + b)
    z = 2 + math.sqrt(2)
    q1, q0 = math.sqrt(2) / z, 1 / z
    want = -4 * (p1 * math.log(q1) + p0 * math.log(q0))
    assert float(topk_kd_loss(logits, values, ids, mask, temperature=2.0)) == pytest.approx(want, abs=1e-6)


def test_topk_kd_loss_averages_over_masked_positions_with_a_target():
    """Three positions: the hand position above (1.25 ln 2), one whose target is one-hot on
    id 2 (-ln 1/4 = 2 ln 2), one masked out, and one with no finite entry (a row without a
    target, left out of the mean whatever the mask): mean = (1.25 + 2) ln 2 / 2."""
    logits = torch.tensor([[[0.0, LN2, 0.0]] * 4])
    values = torch.tensor([[[math.log(0.6), math.log(0.2)], [0.0, NEG], [0.0, NEG], [NEG, NEG]]])
    ids = torch.tensor([[[1, 0], [2, 0], [0, 0], [0, 0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    got = topk_kd_loss(logits, values, ids, mask)
    assert float(got) == pytest.approx(3.25 * LN2 / 2, abs=1e-6)


def test_target_dataset_places_rows_and_kd_term_weighs_them(tiny_llama_path):
    """Sample 0 (3 tokens) has 2 target rows at positions 0 and 1; sample 1 has none. With
    the student's logits [ln 1, ln 2, ln 1] everywhere, the KD term is weight x the mean over
    the two rows: row 0 the hand position (1.25 ln 2), row 1 one-hot on id 0 (2 ln 2)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_path))
    values = np.array([[math.log(0.6), math.log(0.2)], [0.0, NEG]], np.float32)
    ids = np.array([[1, 0], [0, 0]], np.int64)
    data = TargetDataset(tok, [[5, 6, 7], [8, 9]], {0: (values, ids)}, block_size=4, seed=3)
    assert data.block_size == 4
    batch = data.collate([0, 1])
    assert batch["input_ids"].tolist()[0] == [5, 6, 7] and batch["input_ids"].shape == (2, 3)
    assert batch["kd_mask"].tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert batch["kd_ids"][0, :2].tolist() == [[1, 0], [0, 0]]
    np.testing.assert_array_equal(batch["kd_values"][0, :2].numpy(), values)
    assert torch.isneginf(batch["kd_values"][1]).all()
    outputs = SimpleNamespace(logits=torch.tensor([[0.0, LN2, 0.0]]).expand(2, 3, 3))
    got = kd_term(0.5, 1.0, "ce", tail=False)(None, batch, outputs)
    assert float(got) == pytest.approx(0.5 * (1.25 + 2.0) * LN2 / 2, abs=1e-6)
    assert float(kd_term(0.0, 1.0, "ce")(None, batch, outputs)) == 0.0
    with pytest.raises(Exception, match="target rows"):
        TargetDataset(tok, [[5, 6, 7]], {0: (values[:1], ids[:1])}, block_size=4)


# -- the DTW agreement rule -----------------------------------------------------------------
# receiver: WordPiece; teacher: GPT-2 byte-level BPE. The teacher reads the text in pieces
# that do not match the receiver's: "andth" | "us" | "ĠWe" against "and" | "thus" | "we".
RECV = Vocabulary.from_dict(
    {"[UNK]": 0, "and": 1, "thus": 2, "we": 3, "##us": 4, "go": 5}, "wordpiece", {"unk": "[UNK]"}
)
TEACH = Vocabulary.from_dict(
    {"<|endoftext|>": 0, "andth": 1, "us": 2, "ĠWe": 3, "Ġgo": 4, "Ġthus": 5},
    "bytelevel",
    {"eos": "<|endoftext|>"},
)
RECV_IDS, TEACH_IDS = [1, 2, 3], [1, 2, 3]
# teacher row 0 is over its token 1 ("us"), row 1 over its token 2 ("ĠWe")
T_VALUES = np.array([[math.log(0.7), math.log(0.2)], [math.log(0.6), math.log(0.3)]], np.float32)
T_IDS = np.array([[5, 2], [3, 4]], np.int64)  # ["Ġthus", "us"], ["ĠWe", "Ġgo"]


@pytest.fixture(scope="module")
def vmap():
    m = build_vocab_map(TEACH, RECV, workers=1)
    # exact matches of normal forms, and "ĠWe" (no "▁We" in the receiver) one edit from "▁we"
    assert [int(m.ids[i]) for i in (2, 3, 4, 5)] == [4, 3, 5, 2]
    return m


def test_tokens_agree_by_normal_form_or_by_the_map(vmap):
    # "thus" / "us": other word (map: us -> ##us); "we" / "ĠWe": by the map only (normal forms
    # "▁we" / "▁We"); "thus" / "Ġthus": equal normal forms; "go" / "Ġgo": both
    got = tokens_agree([2, 3, 2, 5], RECV, [2, 3, 5, 4], TEACH, vmap)
    assert got.tolist() == [False, True, True, True]


def test_agree_rule_keeps_only_agreeing_rows(vmap):
    """DTW pairs and -> andth, thus -> us, we -> We one to one (cost 2 + 2 + 1, the diagonal).
    Row 0 (over "thus"): its partner "us" is another word: one-hot on "thus" (id 2). Row 1
    (over "we"): "ĠWe" agrees through the map: the teacher's row, "ĠWe" -> 3, "Ġgo" -> 5."""
    t = aligned_targets(RECV_IDS, RECV, TEACH_IDS, TEACH, T_VALUES, T_IDS, vmap)
    assert t.aligned.tolist() == [True, True] and t.agree.tolist() == [False, True]
    assert t.matched.tolist() == [False, True]
    np.testing.assert_array_equal(t.values[0], [0.0, NEG])
    assert t.ids[0, 0] == 2
    np.testing.assert_allclose(t.values[1], [math.log(0.6), math.log(0.3)], rtol=1e-6)
    assert t.ids[1].tolist() == [3, 5]
    counter = AlignCounter()
    counter.add(t)
    assert counter.metrics() == {
        "kd_aligned_fraction": 0.5, "kd_one_to_one_fraction": 1.0, "kd_agree_fraction": 0.5,
    }


def test_one_to_one_rule_keeps_the_misaligned_row(vmap):
    """The rule before the agreement check: row 0 takes the row over "us", mapped
    "Ġthus" -> 2 and "us" -> 4: a distribution for another word than the label "thus"."""
    t = aligned_targets(RECV_IDS, RECV, TEACH_IDS, TEACH, T_VALUES, T_IDS, vmap, rule="one_to_one")
    assert t.matched.tolist() == [True, True] and t.agree.tolist() == [False, True]
    np.testing.assert_allclose(t.values[0], [math.log(0.7), math.log(0.2)], rtol=1e-6)
    assert t.ids[0].tolist() == [2, 4]
    with pytest.raises(ValueError, match="align rule"):
        aligned_targets(RECV_IDS, RECV, TEACH_IDS, TEACH, T_VALUES, T_IDS, vmap, rule="dtw")


def test_agree_rule_falls_back_to_the_receivers_own_rows(vmap):
    """keep_own="self": the disagreeing row takes the receiver's own row (3 entries: wider
    than the teacher's 2), the agreeing one stays the teacher's (padded with -inf)."""
    own_v = np.array([[-0.1, -2.5, -3.0], [-0.2, -2.0, -4.0]], np.float32)
    own_i = np.array([[2, 4, 1], [3, 1, 5]], np.int64)
    t = aligned_targets(RECV_IDS, RECV, TEACH_IDS, TEACH, T_VALUES, T_IDS, vmap, own=(own_v, own_i))
    np.testing.assert_array_equal(t.values[0], own_v[0])
    assert t.ids[0].tolist() == [2, 4, 1]
    np.testing.assert_allclose(t.values[1], [math.log(0.6), math.log(0.3), NEG], rtol=1e-6)
    assert t.ids[1, :2].tolist() == [3, 5]


def test_dual_min_ce_across_two_tokenizers(vmap):
    """Two teachers of different tokenizers for one receiver (the server's case): per sample
    the teacher of lowest CE if it is below the receiver's own. Sample 0: A 1.0 < B 2.0 and
    < own 1.5 -> A; sample 1: B 2.0 < own 2.5 -> B; sample 2: the best (B 2.8) is not below
    own 2.5 -> none. Then each chosen sample is aligned through its own teacher's map."""
    ces = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.8]])
    chosen = dual_min_ce_batch(ces, np.array([1.5, 2.5, 2.5]))
    assert chosen.tolist() == [0, 1, -1]
    # teacher B: SentencePiece ("▁"), reading "and thus we" as "▁and" | "▁thus" | "▁we"
    b = Vocabulary.from_dict({"<unk>": 0, "▁and": 1, "▁thus": 2, "▁we": 3, "▁go": 4}, "metaspace",
                             {"unk": "<unk>"})
    bmap = build_vocab_map(b, RECV, workers=1)
    b_values = np.array([[math.log(0.9), math.log(0.1)], [math.log(0.5), math.log(0.4)]], np.float32)
    b_ids = np.array([[2, 4], [3, 4]], np.int64)
    targets = {
        0: aligned_targets(RECV_IDS, RECV, TEACH_IDS, TEACH, T_VALUES, T_IDS, vmap),
        1: aligned_targets(RECV_IDS, RECV, [1, 2, 3], b, b_values, b_ids, bmap),
    }
    assert targets[0].matched.tolist() == [False, True]  # as in the agreement test
    # B's tokens agree everywhere: its rows, "▁thus" -> 2, "▁go" -> 5, "▁we" -> 3
    t = targets[1]
    assert t.agree.tolist() == [True, True] and t.matched.tolist() == [True, True]
    assert t.ids.tolist() == [[2, 5], [3, 5]]
    np.testing.assert_allclose(np.exp(t.values), [[0.9, 0.1], [0.5, 0.4]], rtol=1e-6)


# -- the shared soft-target KD (FedCoLLM, FedPT) on a 3-token vocabulary --------------------
def test_kd_loss_and_task_loss_on_three_tokens():
    """Teacher p = [1/2, 1/4, 1/4], student q = [1/4, 1/2, 1/4] at the one counted position:
    KL(p || q) = 1/2 ln 2 + 1/4 ln 1/2 = 1/4 ln 2; CE = -(1/2 ln 1/4 + 1/4 ln 1/2 + 1/4 ln 1/4)
    = 7/4 ln 2. The second position is masked out. The task loss of label 1 after position 0
    is -ln q(1) = ln 2."""
    student = torch.tensor([[[0.0, LN2, 0.0], [5.0, 0.0, 0.0]]])
    teacher = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    mask = torch.tensor([[1.0, 0.0]])
    assert float(kd_loss(student, teacher, mask, kind="kl")) == pytest.approx(0.25 * LN2, abs=1e-6)
    assert float(kd_loss(student, teacher, mask, kind="ce")) == pytest.approx(1.75 * LN2, abs=1e-6)
    # the LLM's side of FedCoLLM's mutual loss: the same formula with the roles swapped,
    # KL(q || p) = 1/4 ln 1/2 + 1/2 ln 2 = 1/4 ln 2 (this pair is symmetric)
    assert float(kd_loss(teacher, student, mask, kind="kl")) == pytest.approx(0.25 * LN2, abs=1e-6)
    assert float(task_loss(student, torch.tensor([[-100, 1]]))) == pytest.approx(LN2, abs=1e-6)


def test_proxy_logits_and_their_distillation_target():
    """FedPT's proxy teacher z = z_LLM + alpha (z_tuned - z_base) on 3 tokens, then the
    distribution the student distils from: z_LLM = [0, 0, 0], z_tuned - z_base = [ln 2, 0, 0]
    at alpha 1 gives z = [ln 2, 0, 0], p = [1/2, 1/4, 1/4]; alpha 2 gives p = [4/6, 1/6, 1/6].
    A longer vocabulary is cut to the common size."""
    large = torch.zeros(1, 1, 4)
    tuned = torch.tensor([[[1.0 + LN2, 1.0, 1.0]]])
    base = torch.ones(1, 1, 3)
    z = proxy_logits(large, tuned, base)
    assert z.shape == (1, 1, 3)
    np.testing.assert_allclose(torch.softmax(z, -1).numpy().ravel(), [0.5, 0.25, 0.25], rtol=1e-6)
    z2 = proxy_logits(large, tuned, base, alpha=2.0)
    np.testing.assert_allclose(torch.softmax(z2, -1).numpy().ravel(), [4 / 6, 1 / 6, 1 / 6], rtol=1e-6)
    # distilling a student q = [1/4, 1/2, 1/4] towards the alpha-1 proxy: KL = 1/4 ln 2
    student = torch.tensor([[[0.0, LN2, 0.0]]])
    assert float(kd_loss(student, z, torch.ones(1, 1))) == pytest.approx(0.25 * LN2, abs=1e-6)
