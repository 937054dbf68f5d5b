"""Where a device's private and held-out data come from, described in its config file:

    {"texts_file": "notes.txt"}                 one sample per line
    {"jsonl_file": "pairs.jsonl"}               {"text": ...} or {"prompt": ..., "response": ...} per line
    {"zoo_domain": "computers", "split": "private", "shard": [0, 3], "limit": 200}
                                                the project's bundled domains (demo, tests)
"""

from __future__ import annotations

import json
from pathlib import Path


class DataSpecError(ValueError):
    pass


def load_samples(spec: dict | None, base: Path | None = None) -> list:
    if not spec:
        return []
    base = base or Path(".")
    limit = spec.get("limit")
    if "texts_file" in spec:
        p = base / spec["texts_file"]
        items = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif "jsonl_file" in spec:
        items = []
        for n, line in enumerate((base / spec["jsonl_file"]).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "text" in row:
                items.append(row["text"])
            elif "prompt" in row and "response" in row:
                items.append({"prompt": row["prompt"], "response": row["response"]})
            else:
                raise DataSpecError(f"line {n}: expected 'text' or 'prompt'+'response'")
    elif "zoo_domain" in spec:
        from algorithms.zoo.datasets import client_shards, domain_split

        split = spec.get("split", "private")
        if "shard" in spec:
            index, count = spec["shard"]
            if split != "private":
                raise DataSpecError("shards are cut from the private split only")
            items = client_shards(spec["zoo_domain"], int(count), int(spec.get("seed", 0)))[int(index)]
        else:
            items = domain_split(spec["zoo_domain"], split)
    else:
        raise DataSpecError(f"unknown data spec {spec!r}: use texts_file, jsonl_file or zoo_domain")
    return list(items[: int(limit)] if limit else items)
