"""The project's own tiny pretrained LMs and the real text bundled with them.

``build_zoo()`` (see :mod:`algorithms.zoo.build`) trains and caches a Llama-style LLM, a
Llama-style SLM that shares its tokenizer and a GPT-2-style SLM with a tokenizer of another
style; :mod:`algorithms.zoo.datasets` serves the bundled general text and client domains.
Heavy imports (torch, transformers) happen only when a build or a load actually runs.
"""

from __future__ import annotations

from .build import ZooError, ZooPaths, build_zoo, default_cache_dir, recipe_key
from .cli import zoo_cli
from .datasets import client_shards, domain_split, domains, general_text
from .recipes import FULL, MODEL_NAMES, QUICK, ZooRecipe

__all__ = [
    "FULL",
    "MODEL_NAMES",
    "QUICK",
    "ZooError",
    "ZooPaths",
    "ZooRecipe",
    "build_zoo",
    "client_shards",
    "default_cache_dir",
    "domain_split",
    "domains",
    "general_text",
    "recipe_key",
    "zoo_cli",
]
