"""Regenerate tests/golden/*.bin. Run only when adding a NEW golden file: existing files are
the contract that old devices rely on and must keep decoding unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wire_helpers import fixed_federation, sample_task, sample_update  # noqa: E402

from bridge.codec import encode  # noqa: E402
from bridge.envelope import Sealer  # noqa: E402

GOLDEN_TS = 1_790_000_000.0
out = Path(__file__).resolve().parent / "golden"


def main() -> None:
    ids, directory = fixed_federation()
    (out / "update_v1.msg").write_bytes(encode(sample_update()))
    (out / "task_v1.msg").write_bytes(encode(sample_task()))
    sealer = Sealer(ids["alice"], directory, max_message_bytes=1 << 20, clock=lambda: GOLDEN_TS)
    (out / "update_v1.env").write_bytes(sealer.seal("aggregator", "update", encode(sample_update()), round=3))


if __name__ == "__main__":
    main()
