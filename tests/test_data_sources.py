"""Data sources of a device (edge_sdk/data.py) and chat-template pairs (algorithms/core/textdata).

Every file format loads the same samples; a bad spec or a bad cell gives a DataSpecError that
names the file, the column and the line/row. Chat-template pairs are checked label by label
against the tokenizer's own encoding of hand-written renderings.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import sys

import pytest

from algorithms.core.errors import DataError
from algorithms.core.textdata import IGNORE_INDEX, TokenizedDataset, split_conversation
from edge_sdk.data import DataSpecError, load_samples
from tests.tiny_models import TINY_CORPUS, TINY_PAIRS

PAIRS = [{"prompt": p, "response": r} for p, r in TINY_PAIRS]
MESSAGES = [
    [{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in TINY_PAIRS
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _csv(path, rows, delimiter=","):
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------
# formats


def test_text_formats_load_identical_samples(tmp_path):
    files = {
        "a.jsonl": _jsonl(tmp_path / "a.jsonl", PAIRS),
        "a.json": tmp_path / "a.json",
        "a.csv": _csv(tmp_path / "a.csv", PAIRS),
        "a.tsv": _csv(tmp_path / "a.tsv", PAIRS, delimiter="\t"),
        "raw.data": _jsonl(tmp_path / "raw.data", PAIRS),
    }
    files["a.json"].write_text(json.dumps(PAIRS, indent=1), encoding="utf-8")
    for name in ["a.jsonl", "a.json", "a.csv", "a.tsv"]:
        assert load_samples({"file": name}, tmp_path) == PAIRS, name
    assert load_samples({"file": "raw.data", "format": "jsonl"}, tmp_path) == PAIRS
    assert load_samples({"file": str(files["a.csv"])}) == PAIRS  # absolute path, no base
    # the legacy spec still reads the same file
    assert load_samples({"jsonl_file": "a.jsonl"}, tmp_path) == PAIRS
    assert load_samples({"file": "a.csv", "limit": 2}, tmp_path) == PAIRS[:2]

    # texts: a text column, a .txt file, the legacy texts_file
    _jsonl(tmp_path / "t.jsonl", [{"text": t, "id": i} for i, t in enumerate(TINY_CORPUS)])
    (tmp_path / "t.txt").write_text("\n".join(TINY_CORPUS) + "\n\n", encoding="utf-8")
    assert load_samples({"file": "t.jsonl"}, tmp_path) == TINY_CORPUS
    assert load_samples({"file": "t.txt"}, tmp_path) == TINY_CORPUS
    assert load_samples({"texts_file": "t.txt"}, tmp_path) == TINY_CORPUS

    # named columns, with a system column (empty cells mean no system prompt)
    rows = [
        {"q": p["prompt"], "a": p["response"], "sys": "Be brief." if i == 0 else ""}
        for i, p in enumerate(PAIRS)
    ]
    _csv(tmp_path / "named.csv", rows)
    spec = {"file": "named.csv", "prompt_column": "q", "response_column": "a"}
    assert load_samples(spec, tmp_path) == PAIRS
    got = load_samples({**spec, "system_column": "sys"}, tmp_path)
    assert got == [{**PAIRS[0], "system": "Be brief."}, *PAIRS[1:]]
    _csv(tmp_path / "t.csv", [{"body": t} for t in TINY_CORPUS])
    assert load_samples({"file": "t.csv", "text_column": "body"}, tmp_path) == TINY_CORPUS

    # chat "messages": a JSON column (a JSON string per cell in CSV) gives the same pairs
    _jsonl(tmp_path / "m.jsonl", [{"messages": m} for m in MESSAGES])
    _csv(tmp_path / "m.csv", [{"messages": json.dumps(m)} for m in MESSAGES])
    assert load_samples({"file": "m.jsonl"}, tmp_path) == PAIRS
    assert load_samples({"file": "m.csv"}, tmp_path) == PAIRS
    assert load_samples({"file": "m.jsonl", "messages_column": "messages"}, tmp_path) == PAIRS

    # "chat_template": "never" marks the pairs (texts are left alone)
    never = load_samples({"file": "a.csv", "chat_template": "never"}, tmp_path)
    assert never == [{**p, "chat_template": "never"} for p in PAIRS]
    assert load_samples({"file": "t.txt", "chat_template": "never"}, tmp_path) == TINY_CORPUS


def test_split_conversation():
    sys_msg = {"role": "system", "content": "Be brief."}
    u1, a1 = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    u2, a2 = {"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue."}
    assert split_conversation([u1, a1]) == {"prompt": "Hi", "response": "Hello."}
    assert split_conversation([sys_msg, u1, a1]) == {
        "prompt": "Hi",
        "response": "Hello.",
        "system": "Be brief.",
    }
    assert split_conversation([sys_msg, u1, a1, u2, a2]) == {
        "prompt": [u1, a1, u2],
        "response": "Blue.",
        "system": "Be brief.",
    }
    for bad, match in [
        ([u1], "no assistant turn"),
        ([u1, a1, u2], "goes on after its last assistant turn"),
        ([sys_msg, a1], "no user turn"),
        ([], "non-empty list"),
        ("Hi", "non-empty list"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{"role": "bot", "content": "x"}, a1], "role 'bot'"),
        ([{"role": "user", "content": 3}, a1], "content must be a string"),
    ]:
        with pytest.raises(DataError, match=match):
            split_conversation(bad)


def test_parquet_and_datasets_dir_load_identical_samples(tmp_path):
    pytest.importorskip("pyarrow")
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(PAIRS), tmp_path / "a.parquet")
    assert load_samples({"file": "a.parquet"}, tmp_path) == PAIRS
    assert load_samples({"file": "a.parquet", "limit": 3}, tmp_path) == PAIRS[:3]
    pq.write_table(pa.Table.from_pylist([{"messages": m} for m in MESSAGES]), tmp_path / "m.pq")
    assert load_samples({"file": "m.pq"}, tmp_path) == PAIRS

    datasets.Dataset.from_list(PAIRS).save_to_disk(str(tmp_path / "ds"))
    assert load_samples({"file": "ds"}, tmp_path) == PAIRS
    assert load_samples({"file": "ds", "limit": 2}, tmp_path) == PAIRS[:2]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"messages": m} for m in MESSAGES]),
            "test": datasets.Dataset.from_list([{"text": t} for t in TINY_CORPUS]),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_samples({"file": "dd", "split": "train"}, tmp_path) == PAIRS
    assert load_samples({"file": "dd", "split": "test"}, tmp_path) == TINY_CORPUS
    with pytest.raises(DataSpecError, match=r"holds the splits \['train', 'test'\]"):
        load_samples({"file": "dd"}, tmp_path)
    with pytest.raises(DataSpecError, match=r"no split 'dev'; its splits are \['train', 'test'\]"):
        load_samples({"file": "dd", "split": "dev"}, tmp_path)
    with pytest.raises(DataSpecError, match="single dataset"):
        load_samples({"file": "ds", "split": "train"}, tmp_path)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(
        str(tmp_path / "one")
    )
    assert load_samples({"file": "one"}, tmp_path) == PAIRS  # a single split needs no name

    # a missing column names the file, the column and the columns there are
    with pytest.raises(DataSpecError) as e:
        load_samples({"file": "a.parquet", "prompt_column": "question"}, tmp_path)
    msg = str(e.value)
    assert "a.parquet" in msg and "'question'" in msg and "['prompt', 'response']" in msg
    # a null cell, by row
    rows = [dict(p) for p in PAIRS]
    rows[2]["response"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "null.parquet")
    with pytest.raises(DataSpecError, match=r"null.parquet, row 3: column 'response' is empty"):
        load_samples({"file": "null.parquet"}, tmp_path)
    datasets.Dataset.from_list([{"prompt": "p", "response": 7}]).save_to_disk(str(tmp_path / "i"))
    with pytest.raises(DataSpecError, match=r"row 1: column 'response' holds int 7, not a string"):
        load_samples({"file": "i"}, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSpecError, match="not a directory written by save_to_disk"):
        load_samples({"file": "empty"}, tmp_path)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataSpecError, match="can't read it as Parquet"):
        load_samples({"file": "bad.parquet"}, tmp_path)


def test_missing_extra_says_which_to_install(tmp_path, monkeypatch):
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataSpecError, match=r"needs pyarrow: pip install 'cotune\[data\]'"):
        load_samples({"file": "a.parquet"}, tmp_path)
    with pytest.raises(DataSpecError, match=r"needs the datasets package: .*cotune\[data\]"):
        load_samples({"file": "ds"}, tmp_path)


def test_spec_and_cell_errors(tmp_path):
    _jsonl(tmp_path / "a.jsonl", PAIRS)
    with pytest.raises(DataSpecError) as e:
        load_samples({"file": "a.jsonl", "response_column": "answer"}, tmp_path)
    assert str(e.value) == (
        f"{tmp_path / 'a.jsonl'}: no column 'answer' (the response column); "
        "its columns are ['prompt', 'response']"
    )
    with pytest.raises(DataSpecError, match=r"no column 'body' \(the text column\)"):
        load_samples({"file": "a.jsonl", "text_column": "body"}, tmp_path)
    _csv(tmp_path / "x.csv", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataSpecError, match=r"x.csv: found no sample columns .* \['question', "):
        load_samples({"file": "x.csv"}, tmp_path)

    # empty files
    (tmp_path / "e.jsonl").write_text("\n\n")
    (tmp_path / "e.csv").write_text("")
    _csv(tmp_path / "h.csv", [{"prompt": "p", "response": "r"}])
    (tmp_path / "h.csv").write_text("prompt,response\n")
    with pytest.raises(DataSpecError, match="e.jsonl has no rows"):
        load_samples({"file": "e.jsonl"}, tmp_path)
    with pytest.raises(DataSpecError, match="e.csv is empty .*header row"):
        load_samples({"file": "e.csv"}, tmp_path)
    with pytest.raises(DataSpecError, match="h.csv has no rows"):
        load_samples({"file": "h.csv"}, tmp_path)

    # wrong types and broken rows, by line
    _jsonl(tmp_path / "t.jsonl", [PAIRS[0], {"prompt": 3, "response": "r"}])
    with pytest.raises(DataSpecError, match=r"t.jsonl, line 2: column 'prompt' holds int 3"):
        load_samples({"file": "t.jsonl"}, tmp_path)
    _jsonl(tmp_path / "n.jsonl", [PAIRS[0], PAIRS[1], {"prompt": "p"}])
    with pytest.raises(DataSpecError, match=r"n.jsonl, line 3: no 'response'"):
        load_samples({"file": "n.jsonl"}, tmp_path)
    (tmp_path / "j.jsonl").write_text(json.dumps(PAIRS[0]) + "\n{oops\n")
    with pytest.raises(DataSpecError, match=r"j.jsonl, line 2: not valid JSON"):
        load_samples({"file": "j.jsonl"}, tmp_path)
    with pytest.raises(DataSpecError, match=r"j.jsonl, line 2: not valid JSON"):
        load_samples({"jsonl_file": "j.jsonl"}, tmp_path)
    (tmp_path / "r.csv").write_text("prompt,response\np,r\nonly one\n")
    with pytest.raises(DataSpecError, match=r"r.csv, line 3: fewer fields"):
        load_samples({"file": "r.csv"}, tmp_path)
    _jsonl(tmp_path / "m.jsonl", [{"messages": MESSAGES[0]}, {"messages": MESSAGES[1][:1]}])
    with pytest.raises(DataSpecError, match=r"m.jsonl, line 2: column 'messages': .*no assistant"):
        load_samples({"file": "m.jsonl"}, tmp_path)

    # the spec itself
    for spec, match in [
        ({"file": "a.jsonl", "prompt_colum": "q"}, r"unknown key\(s\) \['prompt_colum'\]"),
        ({"file": "a.jsonl", "split": "train"}, "'split' applies to a datasets directory"),
        ({"file": "a.jsonl", "format": "xml"}, "unknown data format 'xml'"),
        ({"file": "a.jsonl", "chat_template": "always"}, "'chat_template' must be one of"),
        ({"file": "a.jsonl", "limit": -1}, "'limit' must be"),
        ({"file": "a.jsonl", "jsonl_file": "a.jsonl"}, "two sources"),
        ({"file": "a.jsonl", "text_column": "t", "prompt_column": "p"}, "can't be combined"),
        ({"file": "nope.csv"}, "data file not found"),
        ({"file": "a.jsonl", "format": "datasets"}, "wants a directory"),
        ({"file": "x.xml"}, "not found"),
    ]:
        with pytest.raises(DataSpecError, match=match):
            load_samples(spec, tmp_path)
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataSpecError, match=r"extension '.xml'; set \"format\""):
        load_samples({"file": "x.xml"}, tmp_path)


# ---------------------------------------------------------------------------------------------
# chat templates

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# renders the message count first: the prompt is never a prefix of the full rendering
UNSTABLE = "{{ messages | length }}|" + CHATML


@pytest.fixture(scope="module")
def base_tok():
    from algorithms.core.tokenizer import train_tokenizer

    tok = train_tokenizer(TINY_CORPUS + [p + r for p, r in TINY_PAIRS], 400, style="bytelevel")
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    return tok


def _with_template(tok, template):
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    return tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _plain_rows(tok, pairs, block):
    """Rows as the plain (no template) path builds them, computed here by hand."""
    out = []
    for prompt, response in pairs:
        p = tok(prompt)["input_ids"]
        r = _ids(tok, response) + [tok.eos_token_id]
        ids = p + r
        pad = block - len(ids)
        out.append((ids + [tok.pad_token_id] * pad, [IGNORE_INDEX] * len(p) + r + [-100] * pad))
    return out


def _assert_rows(ds, rows):
    for i, (ids, labels) in enumerate(rows):
        assert ds[i]["input_ids"].tolist() == ids
        assert ds[i]["labels"].tolist() == labels


def test_chat_template_labels_only_the_answer(base_tok):
    tok = _with_template(base_tok, CHATML)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    block = 64
    ds = TokenizedDataset(tok, PAIRS, block)
    assert ds.kind == "pairs" and ds.num_templated_pairs == len(PAIRS)
    for i, (prompt, response) in enumerate(TINY_PAIRS):
        p_text = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        f_text = p_text + f"{response}<|im_end|>\n"
        p, f = _ids(tok, p_text), _ids(tok, f_text)
        assert f[: len(p)] == p and p[0] == start  # the template's markers are single tokens
        r = f[len(p) :]
        assert r[-2:] == [end, _ids(tok, "\n")[0]]  # the answer, then "<|im_end|>" "\n"
        assert r[:-2] == _ids(tok, f"<|im_start|>{response}")[1:]
        row = ds[i]
        n = len(f)
        assert row["input_ids"].tolist() == f + [tok.pad_token_id] * (block - n)
        assert row["labels"].tolist() == [IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * (block - n)
        assert row["attention_mask"].tolist() == [1] * n + [0] * (block - n)
        assert tok.eos_token_id not in row["input_ids"][:n].tolist()  # the template ends the turn
    assert ds.num_loss_tokens == sum(
        len(_ids(tok, f"<|im_start|>{r}<|im_end|>\n")) - 1 for _, r in TINY_PAIRS
    )

    # a system prompt and a multi-turn conversation: only the last answer carries loss
    conv = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Sky?"},
            {"role": "assistant", "content": "Blue."},
        ]
    }
    p_text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nSky?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    p, f = _ids(tok, p_text), _ids(tok, p_text + "Blue.<|im_end|>\n")
    assert f[: len(p)] == p
    block = 128
    assert len(f) < block
    for data in ([conv], [split_conversation(conv["messages"])]):
        row = TokenizedDataset(tok, data, block)[0]
        assert row["input_ids"][: len(f)].tolist() == f
        assert row["labels"].tolist() == [IGNORE_INDEX] * len(p) + f[len(p) :] + [-100] * (
            block - len(f)
        )

    # too long: the answer is kept, the prompt cut from the left
    long = [("word " * 40, " The sky is blue.")]
    row = TokenizedDataset(tok, long, 12)[0]
    p_text = f"<|im_start|>user\n{'word ' * 40}<|im_end|>\n<|im_start|>assistant\n"
    p, f = _ids(tok, p_text), _ids(tok, p_text + " The sky is blue.<|im_end|>\n")
    assert f[: len(p)] == p and len(p) > 12
    r = f[len(p) :]
    assert row["input_ids"].tolist() == p[-(12 - len(r)) :] + r
    assert row["labels"].tolist() == [IGNORE_INDEX] * (12 - len(r)) + r


def test_chat_template_never_and_no_template_keep_plain_pairs(base_tok, tmp_path):
    tok = _with_template(base_tok, CHATML)
    plain = _plain_rows(base_tok, TINY_PAIRS, 64)
    assert base_tok.chat_template is None
    _assert_rows(TokenizedDataset(base_tok, PAIRS, 64), plain)  # no template: as before
    ds = TokenizedDataset(tok, PAIRS, 64, chat_template="never")
    assert ds.num_templated_pairs == 0
    _assert_rows(ds, plain)
    # per pair, as load_samples writes it for {"chat_template": "never"}
    _jsonl(tmp_path / "a.jsonl", PAIRS)
    data = load_samples({"file": "a.jsonl", "chat_template": "never"}, tmp_path)
    _assert_rows(TokenizedDataset(tok, data, 64), plain)
    mixed = TokenizedDataset(tok, [data[0], PAIRS[1]], 64)
    assert mixed.num_templated_pairs == 1
    assert mixed[0]["input_ids"].tolist() == plain[0][0]
    with pytest.raises(DataError, match="chat_template must be one of"):
        TokenizedDataset(tok, PAIRS, 64, chat_template="always")

    # without a template a system prompt / conversation is written as role lines
    conv = split_conversation(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Sky?"},
            {"role": "assistant", "content": " Blue."},
        ]
    )
    row = TokenizedDataset(base_tok, [conv], 64)[0]
    (expected,) = _plain_rows(
        base_tok, [("System: Be brief.\nUser: Sky?\nAssistant:", " Blue.")], 64
    )
    assert row["input_ids"].tolist() == expected[0] and row["labels"].tolist() == expected[1]


def test_unstable_template_falls_back_with_a_warning(base_tok, caplog):
    tok = _with_template(base_tok, UNSTABLE)
    assert not tok.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
    ).startswith(
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True
        )
    )
    with caplog.at_level(logging.WARNING, logger="algorithms.core.textdata"):
        ds = TokenizedDataset(tok, PAIRS, 64)
    assert ds.num_templated_pairs == 0
    assert "not prefix-stable for 4 of 4 pairs" in caplog.text
    _assert_rows(ds, _plain_rows(base_tok, TINY_PAIRS, 64))

    failing = _with_template(base_tok, "{{ raise_exception('no system role') }}")
    with pytest.raises(DataError, match="pair 1: the tokenizer's chat template failed.*no system"):
        TokenizedDataset(failing, [PAIRS[0] | {"chat_template": "never"}, PAIRS[1]], 64)


def test_train_config_carries_the_chat_template_switch():
    from algorithms.core.training import TrainConfig

    assert TrainConfig.from_dict({"chat_template": "never"}).chat_template == "never"
    assert TrainConfig().chat_template == "auto"
    with pytest.raises(ValueError, match="chat_template"):
        TrainConfig(chat_template="sometimes")
