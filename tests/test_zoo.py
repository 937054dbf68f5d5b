"""The model zoo (quick variant) and the bundled datasets."""

from __future__ import annotations

import json
import time

import pytest

from algorithms.zoo import (
    FULL,
    MODEL_NAMES,
    build_zoo,
    client_shards,
    default_cache_dir,
    domain_split,
    domains,
    general_text,
    zoo_cli,
)
from algorithms.zoo.datasets import DOMAIN_SPLITS, DatasetError, domain_texts


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = tmp_path_factory.mktemp("zoo")
    start = time.perf_counter()
    paths = build_zoo(cache_dir=cache, quick=True, progress=False)
    return cache, paths, time.perf_counter() - start


def test_quick_build_is_cached(zoo):
    cache, paths, cold_seconds = zoo
    assert cold_seconds < 180, f"quick zoo took {cold_seconds:.0f}s"
    start = time.perf_counter()
    again = build_zoo(cache_dir=cache, quick=True, progress=False)
    assert time.perf_counter() - start < 1.0
    assert again == paths
    assert again.manifest == paths.manifest
    assert json.loads((paths.root / "manifest.json").read_text()) == paths.manifest
    for name in MODEL_NAMES:
        files = paths.manifest["models"][name]["files"]
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
        assert paths[name].is_dir()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_loads_like_any_checkpoint(zoo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, paths, _ = zoo
    expected = {"llm": "Llama", "slm-llama": "Llama", "slm-gpt2": "GPT2"}
    for name in MODEL_NAMES:
        model = AutoModelForCausalLM.from_pretrained(str(paths[name]))
        tok = AutoTokenizer.from_pretrained(str(paths[name]))
        assert type(model).__name__.startswith(expected[name])
        assert model.config.vocab_size == len(tok)
        assert model.config.tie_word_embeddings
        assert model.config.eos_token_id == tok.eos_token_id
        ids = tok(["In the beginning"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.shape[1], len(tok))
        assert torch.isfinite(logits).all()


def test_tokenizer_pairs(zoo):
    from algorithms.core.tokenizer import tokenizer_style

    _, paths, _ = zoo
    llm_tok = paths.load("llm")[1]
    slm_tok = paths.load("slm-llama")[1]
    gpt2_tok = paths.load("slm-gpt2")[1]
    assert llm_tok.get_vocab() == slm_tok.get_vocab()
    assert (paths.llm / "tokenizer.json").read_bytes() == (
        paths.slm_llama / "tokenizer.json"
    ).read_bytes()
    assert tokenizer_style(llm_tok) == "bytelevel"
    assert tokenizer_style(gpt2_tok) == "metaspace"
    assert len(gpt2_tok) != len(llm_tok)
    assert gpt2_tok.get_vocab() != llm_tok.get_vocab()


def test_pretraining_beats_fresh_init(zoo):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from algorithms.zoo.pretrain import evaluate

    _, paths, _ = zoo
    texts = general_text("test")[:2]
    for name in MODEL_NAMES:
        trained = AutoModelForCausalLM.from_pretrained(str(paths[name]))
        tok = AutoTokenizer.from_pretrained(str(paths[name]))
        torch.manual_seed(0)
        fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(paths[name])))
        trained_loss = evaluate(trained, tok, texts, 64)["loss"]
        fresh_loss = evaluate(fresh, tok, texts, 64)["loss"]
        assert trained_loss < fresh_loss - 0.5, (name, trained_loss, fresh_loss)
        report = paths.manifest["models"][name]["eval"]
        assert report["general_test"]["loss"] < report["general_test_at_init"]["loss"]


def test_cli_reports_cached_zoo(zoo, capsys):
    cache, paths, _ = zoo
    assert zoo_cli(["build", "--quick", "--quiet", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert paths.manifest["key"] in out
    for name in MODEL_NAMES:
        assert name in out


class Vocab:
    """Just what make_model reads of a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_full_recipe_shapes():
    """The full zoo's size ratios and embedding shares, without training it."""
    from algorithms.zoo.pretrain import make_model, param_counts

    sizes = {t.name: t.vocab_size for t in FULL.tokenizers}
    counts = {
        spec.name: param_counts(make_model(spec, Vocab(sizes[spec.tokenizer])))
        for spec in FULL.models
    }
    assert 5e6 < counts["llm"]["total"] < 9e6
    for slm in ("slm-llama", "slm-gpt2"):
        assert 4 <= counts["llm"]["total"] / counts[slm]["total"] <= 6
        assert counts[slm]["embedding_share"] < 0.45
    assert counts["llm"]["embedding_share"] < 0.25
    assert sizes["t1"] != sizes["t2"]


def test_bench_recipe_has_a_stronger_deeper_llm():
    """The benchmark zoo: an LLM of at least 10 layers (FedBiOT drops half its middle) and 2.5x
    the full zoo's parameters; the SLMs keep their shapes (only the GPT-2 trains longer)."""
    from algorithms.zoo.pretrain import make_model, param_counts
    from algorithms.zoo.recipes import BENCH, RECIPES

    assert RECIPES["bench"] is BENCH
    sizes = {t.name: t.vocab_size for t in BENCH.tokenizers}
    llm = param_counts(make_model(BENCH.model("llm"), Vocab(sizes["t1"])))["total"]
    full = param_counts(make_model(FULL.model("llm"), Vocab(sizes["t1"])))["total"]
    assert BENCH.model("llm").layers >= 10 and llm >= 2.5 * full
    assert BENCH.model("llm").train_tokens >= 1.5 * FULL.model("llm").train_tokens
    assert BENCH.model("slm-gpt2").train_tokens >= 2.5 * FULL.model("slm-gpt2").train_tokens
    for slm in ("slm-llama", "slm-gpt2"):
        a, b = BENCH.model(slm), FULL.model(slm)
        assert (a.hidden, a.layers, a.intermediate) == (b.hidden, b.layers, b.intermediate)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("COTUNE_ZOO", str(tmp_path / "z"))
    assert default_cache_dir() == tmp_path / "z"
    monkeypatch.delenv("COTUNE_ZOO")
    assert default_cache_dir().parts[-3:] == (".cache", "cotune", "zoo")


def test_domain_splits_fixed_and_disjoint():
    names = domains()
    assert len(names) >= 6 and "computers" in names
    for domain in names:
        splits = {s: domain_split(domain, s) for s in DOMAIN_SPLITS}
        assert splits == {s: domain_split(domain, s) for s in DOMAIN_SPLITS}
        everything = domain_texts(domain)
        assert sum(len(v) for v in splits.values()) == len(everything)
        seen: set[str] = set()
        for part in splits.values():
            assert part and seen.isdisjoint(part)
            seen.update(part)
        assert seen == set(everything)
        n_train = len(splits["public"]) + len(splits["private"])
        assert abs(len(splits["public"]) - n_train / 5) <= 1
        assert abs(len(splits["test"]) - len(everything) / 10) <= 1


def test_client_shards():
    private = domain_split("science", "private")
    shards = client_shards("science", 4, seed=7)
    assert shards == client_shards("science", 4, seed=7)
    assert shards != client_shards("science", 4, seed=8)
    assert sorted(t for s in shards for t in s) == sorted(private)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(DatasetError, match="at least 1"):
        client_shards("science", 0)
    with pytest.raises(DatasetError, match="unknown domain"):
        domain_split("astrology", "public")
    with pytest.raises(DatasetError, match="unknown domain split"):
        domain_split("science", "train")


def test_general_text_splits():
    parts = {s: general_text(s) for s in ("train", "dev", "test")}
    assert len(parts["train"]) > 10 * len(parts["test"]) > 0
    assert parts["train"][0].startswith("In the beginning God created")
    for a in parts:
        for b in parts:
            if a < b:
                assert set(parts[a]).isdisjoint(parts[b])
    assert not any(ch.isdigit() for ch in parts["train"][0][:40])  # verse numbers stripped
    for split, texts in parts.items():
        assert texts == general_text(split, "kjv") + general_text(split, "fortunes")
    modern = set(general_text("train", "fortunes"))
    for domain in domains():
        assert modern.isdisjoint(domain_texts(domain))
    with pytest.raises(DatasetError):
        general_text("public")
    with pytest.raises(DatasetError):
        general_text("train", "news")


def test_recipe_round_trip_and_lanes():
    from algorithms.zoo.build import _schedule
    from algorithms.zoo.recipes import QUICK, ZooRecipe

    for recipe in (FULL, QUICK):
        assert ZooRecipe.from_json(json.loads(json.dumps(recipe.to_json()))) == recipe
    lanes = _schedule(FULL)
    assert lanes[0] == ["llm"] and sorted(lanes[1]) == ["slm-gpt2", "slm-llama"]
    assert len(_schedule(QUICK)) == 1


def test_cached_zoo_is_verified_against_its_recorded_hashes(zoo, tmp_path):
    import shutil

    from algorithms.zoo.build import ZooError, verify_zoo

    _, paths, _ = zoo
    assert len(paths.digest) == 64 and paths.name.endswith(paths.digest[:12])
    verify_zoo(paths.root, paths.manifest)  # as built
    copy = tmp_path / "copy"
    shutil.copytree(paths.root, copy)
    weights = copy / "slm-gpt2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ZooError, match="slm-gpt2/model.safetensors does not match"):
        verify_zoo(copy, paths.manifest)


# -- reproducible builds ----------------------------------------------------------------------

def _tiny_repro(branch: str):
    """The quick recipe with a few hundred tokens per model, built reproducibly."""
    import dataclasses

    from algorithms.zoo import QUICK

    models = tuple(dataclasses.replace(m, train_tokens=2048) for m in QUICK.models)
    tiny = dataclasses.replace(QUICK, name="tiny", models=models, doc_stride=40)
    return tiny.reproducible_variant(branch)


def _can_build_reproducibly() -> bool:
    from algorithms.zoo.build import ZooError, check_reproducible_host

    try:
        check_reproducible_host(_tiny_repro("avx2"))
    except ZooError:
        return False
    return True


needs_avx2 = pytest.mark.skipif(not _can_build_reproducibly(), reason="reproducible builds run the x86-64 AVX2 kernels")


@needs_avx2
def test_reproducible_build_is_bitwise_the_same_under_another_hosts_settings(tmp_path, monkeypatch):
    """Two builds of a reproducible recipe, the second under the environment of a host that
    would pick other kernels (AVX-512 ATen kernels, MKL's automatic branch and dynamic
    threads, two OpenMP threads): the same checkpoints, bitwise, and the manifest says which
    kernels trained them."""
    recipe = _tiny_repro("avx2")
    a = build_zoo(cache_dir=tmp_path / "a", recipe=recipe, progress=False)
    for var, value in {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO", "MKL_DYNAMIC": "TRUE",
                       "ONEDNN_MAX_CPU_ISA": "ALL", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(var, value)
    b = build_zoo(cache_dir=tmp_path / "b", recipe=recipe, progress=False)
    assert a.name.startswith("tiny-repro-") and a.key == b.key
    assert _only_timings_differ(a.manifest, b.manifest)
    assert a.digest == b.digest
    for m in MODEL_NAMES:
        k = a.manifest["kernels"]["by_model"][m]
        assert k == {"cpu_capability": "AVX2", "threads": 1, "deterministic": True, "bf16_autocast": False}
    assert a.manifest["kernels"]["env"]["MKL_CBWR"] == "AVX2"


def _only_timings_differ(x: dict, y: dict) -> bool:
    def strip(man):
        out = json.loads(json.dumps(man["models"]))
        for m in out.values():
            m.pop("build_seconds", None)
            for k in ("seconds", "tokens_per_s"):
                m["pretrain"].pop(k, None)
        return out

    return strip(x) == strip(y)


#: A reproducible build of the tiny recipe ("compatible": MKL's vendor-neutral branch), made on
#: the machine these figures were recorded on; any x86-64 machine with AVX2 and these library
#: versions must build the same checkpoints (the CI machine is such another machine).
REFERENCE_TINY = {
    "versions": {"torch": "2.13.0", "transformers": "5.25.0", "tokenizers": "0.23.3"},
    "digest": "5f43fd12c022977d612c35a34d5f9898e7f710814899501798c49e5eeda310ff",
}


@needs_avx2
def test_reproducible_build_matches_the_recorded_digest(tmp_path):
    recipe = _tiny_repro("compatible")
    z = build_zoo(cache_dir=tmp_path, recipe=recipe, progress=False)
    versions = {k: z.manifest["versions"][k].split("+")[0] for k in REFERENCE_TINY["versions"]}
    if versions != REFERENCE_TINY["versions"]:
        pytest.skip(f"the reference was built with {REFERENCE_TINY['versions']}, this is {versions}")
    assert z.digest == REFERENCE_TINY["digest"], (
        f"a reproducible build here gives {z.digest}, the recorded one {REFERENCE_TINY['digest']}: "
        f"the kernels pinned by {z.manifest['kernels']['env']} did not hold")


def test_reproducible_recipe_rules():
    from algorithms.zoo.build import kernel_env, recipe_key
    from algorithms.zoo.recipes import BENCH, recipe_named

    r = BENCH.reproducible_variant()
    assert (r.name, r.reproducible, r.bf16_autocast) == ("bench-repro", "avx2", False)
    assert recipe_named("bench-repro") == r and recipe_named("bench") is BENCH
    assert recipe_key(r) != recipe_key(BENCH)
    assert "reproducible" not in BENCH.to_json()  # the host-kernel zoos keep their cache keys
    assert kernel_env(BENCH) == {}
    assert kernel_env(BENCH.reproducible_variant("compatible"))["MKL_CBWR"] == "COMPATIBLE"
    with pytest.raises(ValueError, match="fp32"):
        import dataclasses

        dataclasses.replace(BENCH, reproducible="avx2")
    with pytest.raises(ValueError, match="one of"):
        BENCH.reproducible_variant("avx512")
    with pytest.raises(KeyError, match="-repro"):
        recipe_named("nope")
