"""What an aggregate must be, recomputed from what the virtual devices recorded (their updates
are deterministic in (seed, party, round)): the reference for tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load


def sent_rows(work: Path) -> list[dict]:
    """Every row the device workers recorded (``sent-*.jsonl`` in the run's work directory)."""
    rows = []
    for path in sorted(Path(work).glob("sent-*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def sent_global(work: Path, rows: list[dict], round: int) -> dict[str, np.ndarray]:
    """The global the devices trained on in ``round`` (needs ``keep_blobs``)."""
    shas = {r["global_sha"] for r in rows if not r.get("final") and r["round"] == round}
    if len(shas) != 1:
        raise ValueError(f"round {round}: devices trained on {len(shas)} different globals")
    return st_load((Path(work) / "blobs" / f"{shas.pop()}.safetensors").read_bytes())


def secure_mean(work: Path, rows: list[dict], round: int, *, clip: float, weight_cap: int,
                seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float, int]:
    """(expected global, the round's reference global, weight sum, inputs) of a secure round
    without noise: reference + sum(w_i clip(delta_i)) / sum(w_i) over the devices whose masked
    input was sent in ``round``, in float64."""
    from aggregator.secure_round import states_from_delta
    from aggregator.validation import UpdateSpec
    from edge_sdk.secure_upload import secure_input

    from .device import fake_update, num_examples_for

    ref = sent_global(work, rows, round)
    spec = {n: (a.shape, a.dtype.name) for n, a in ref.items()}
    total, weight, count = None, 0.0, 0
    for r in rows:
        if r.get("final") or r["round"] != round:
            continue
        n = num_examples_for(r["party"], round, seed)
        values, w, _ = secure_input(fake_update(spec, r["party"], round, seed), ref, clip=clip, value_range=clip,
                                    num_examples=n, weight_cap=weight_cap)
        total = values if total is None else total + values
        weight += w
        count += 1
    spec = UpdateSpec.from_state(ref)
    ref64 = {name: spec.reference64(name) for name in spec.names}
    return states_from_delta(spec, total / weight), ref64, weight, count
