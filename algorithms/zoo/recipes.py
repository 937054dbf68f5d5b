"""What the zoo builds: tokenizers, model shapes and pretraining budgets, as plain data.

A recipe is hashed (together with the bundled data) into the cache key, so changing any
number here rebuilds the zoo instead of silently reusing an old one. Bump ``ZOO_VERSION``
when the build *code* changes in a way that alters the checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ZOO_VERSION = 1
MODEL_NAMES = ("llm", "slm-llama", "slm-gpt2")

#: reproducible builds (``ZooRecipe.reproducible``): the kernel branch every build machine is
#: held to, so that the checkpoints are bitwise the same on any machine with the same library
#: versions. The host's fastest kernels (AVX-512, AMX bf16) round differently from an AVX2-only
#: CPU: the same commit built elsewhere gave domain losses 0.07 nats apart.
#: - "avx2": ATen, oneDNN and MKL on their AVX2 code paths (MKL's conditional numerical
#:   reproducibility, ``MKL_CBWR=AVX2``): any Intel CPU with AVX2; fp32, 1.3x the host's fp32
#:   step time and about 3x its bf16 step time (measured on the bench LLM).
#: - "compatible": the same with MKL's vendor-neutral SSE2 branch (``MKL_CBWR=COMPATIBLE``):
#:   any x86-64 CPU with AVX2, Intel or AMD, 2.2x slower than "avx2" in the matrix products.
REPRODUCIBLE_BRANCHES = ("avx2", "compatible")


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    style: str
    vocab_size: int


@dataclass(frozen=True)
class ModelSpec:
    """One causal LM: its architecture, tokenizer and pretraining budget."""

    name: str
    arch: str  # "llama" or "gpt2"
    tokenizer: str  # a TokenizerSpec name
    hidden: int
    layers: int
    heads: int
    kv_heads: int  # llama only (grouped-query attention)
    intermediate: int  # MLP width
    max_positions: int
    train_tokens: int
    lr: float
    seed: int


@dataclass(frozen=True)
class ZooRecipe:
    name: str
    tokenizers: tuple[TokenizerSpec, ...]
    models: tuple[ModelSpec, ...]
    seq_len: int
    batch_size: int
    warmup_steps: int
    weight_decay: float = 0.1
    # Tokenizers also see the public slice of every domain, as a real LLM tokenizer has seen
    # some text of every register; pretraining itself uses general text only.
    tokenizer_text: str = "general-train+domain-public"
    doc_stride: int = 1  # use every n-th general train document (quick builds use fewer)
    modern_repeat: int = 2  # the modern general text is small next to the Bible: repeat it
    lanes: int = 2  # models trained side by side, one process each
    threads_per_lane: int = 1
    bf16_autocast: bool = True
    version: int = ZOO_VERSION
    extra: dict = field(default_factory=dict)
    #: None: the host's fastest kernels (not reproducible across CPUs); or one of
    #: REPRODUCIBLE_BRANCHES: pinned kernels, fp32, every model in a fresh worker process
    reproducible: str | None = None

    def __post_init__(self) -> None:
        if self.reproducible is not None:
            if self.reproducible not in REPRODUCIBLE_BRANCHES:
                raise ValueError(f"reproducible must be None or one of {REPRODUCIBLE_BRANCHES}, "
                                 f"got {self.reproducible!r}")
            if self.bf16_autocast:
                raise ValueError("a reproducible recipe trains in fp32: bf16 kernels differ by CPU "
                                 "(AMX, AVX512-BF16 or emulated); use ZooRecipe.reproducible_variant()")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        if data["reproducible"] is None:  # the keys (and caches) of the host-kernel recipes stay valid
            del data["reproducible"]
        return data

    def reproducible_variant(self, branch: str = "avx2") -> ZooRecipe:
        """This recipe built reproducibly: named ``<name>-repro``, its own cache key."""
        return dataclasses.replace(self, name=f"{self.name}-repro", reproducible=branch,
                                   bf16_autocast=False)

    @classmethod
    def from_json(cls, data: dict) -> ZooRecipe:
        data = dict(data)
        data["tokenizers"] = tuple(TokenizerSpec(**t) for t in data["tokenizers"])
        data["models"] = tuple(ModelSpec(**m) for m in data["models"])
        return cls(**data)

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def tokenizer(self, name: str) -> TokenizerSpec:
        for spec in self.tokenizers:
            if spec.name == name:
                return spec
        raise KeyError(name)


FULL = ZooRecipe(
    name="full",
    tokenizers=(
        TokenizerSpec("t1", "bytelevel", 4096),
        TokenizerSpec("t2", "metaspace", 3072),
    ),
    # Five wide layers for the LLM: on a CPU, fewer and wider layers train ~30 % faster per
    # token than eight narrow ones of the same size. The LLM gets the most tokens, as it must
    # end up clearly stronger than the SLMs; it trains in one lane while the two SLMs share
    # the other. Learning rates were measured at 0.5M tokens: the 320-wide LLM reached a
    # held-out loss of 5.00 at 2e-3, 5.02 at 1e-3 and 5.40 at 4e-3.
    models=(
        ModelSpec("llm", "llama", "t1", hidden=320, layers=5, heads=5, kv_heads=1,
                  intermediate=864, max_positions=512, train_tokens=1_600_000, lr=2e-3, seed=1),
        ModelSpec("slm-llama", "llama", "t1", hidden=128, layers=5, heads=4, kv_heads=2,
                  intermediate=344, max_positions=512, train_tokens=1_200_000, lr=6e-3, seed=2),
        ModelSpec("slm-gpt2", "gpt2", "t2", hidden=128, layers=5, heads=4, kv_heads=4,
                  intermediate=512, max_positions=512, train_tokens=1_200_000, lr=6e-3, seed=3),
    ),
    seq_len=256,
    batch_size=8,
    warmup_steps=50,
)  # fmt: skip

QUICK = ZooRecipe(
    name="quick",
    tokenizers=(
        TokenizerSpec("t1", "bytelevel", 512),
        TokenizerSpec("t2", "metaspace", 448),
    ),
    models=(
        ModelSpec("llm", "llama", "t1", hidden=64, layers=2, heads=2, kv_heads=1,
                  intermediate=160, max_positions=128, train_tokens=40_000, lr=5e-3, seed=1),
        ModelSpec("slm-llama", "llama", "t1", hidden=32, layers=2, heads=2, kv_heads=1,
                  intermediate=80, max_positions=128, train_tokens=40_000, lr=8e-3, seed=2),
        ModelSpec("slm-gpt2", "gpt2", "t2", hidden=32, layers=2, heads=2, kv_heads=2,
                  intermediate=128, max_positions=128, train_tokens=40_000, lr=8e-3, seed=3),
    ),
    seq_len=64,
    batch_size=16,
    warmup_steps=5,
    doc_stride=10,
    lanes=1,  # in-process: starting worker interpreters would cost more than the training
)  # fmt: skip

# The benchmark zoo (``cotune zoo build --recipe bench``): an LLM that is clearly stronger than
# its SLMs, with enough decoder layers for FedBiOT to drop half of its middle. 10 layers of 384
# (2.6x the full zoo's LLM parameters) on 1.75x its tokens, about 1.5 passes over the general text;
# the GPT-2 SLM on 2.5x its tokens. Sized to build in under 45 minutes on 2 cores: the LLM trains
# alone in one lane, the two SLMs share the other. The SLMs' shapes are the full zoo's, so
# the quality figures move because the teacher got better, not the students.
BENCH = ZooRecipe(
    name="bench",
    tokenizers=FULL.tokenizers,
    models=(
        ModelSpec("llm", "llama", "t1", hidden=384, layers=10, heads=6, kv_heads=2,
                  intermediate=1024, max_positions=512, train_tokens=2_800_000, lr=1.5e-3, seed=1),
        ModelSpec("slm-llama", "llama", "t1", hidden=128, layers=5, heads=4, kv_heads=2,
                  intermediate=344, max_positions=512, train_tokens=1_200_000, lr=6e-3, seed=2),
        ModelSpec("slm-gpt2", "gpt2", "t2", hidden=128, layers=5, heads=4, kv_heads=4,
                  intermediate=512, max_positions=512, train_tokens=3_000_000, lr=6e-3, seed=3),
    ),
    seq_len=256,
    batch_size=8,
    warmup_steps=100,
)  # fmt: skip

RECIPES = {"full": FULL, "quick": QUICK, "bench": BENCH}


def recipe_named(name: str) -> ZooRecipe:
    """A recipe by name; ``<name>-repro`` is its reproducible variant (branch "avx2")."""
    base = name.removesuffix("-repro")
    if base not in RECIPES:
        raise KeyError(f"unknown zoo recipe {name!r}; choose one of {sorted(RECIPES)}, each with "
                       "an optional -repro suffix")
    return RECIPES[base].reproducible_variant() if name.endswith("-repro") else RECIPES[base]
