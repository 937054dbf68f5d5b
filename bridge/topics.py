"""Topic layout of one federation (DESIGN.md, "Wire").

    cotune/F/down/<client>    aggregator -> client
    cotune/F/up/<client>      client -> aggregator
    cotune/F/bcast            aggregator -> all clients
    cotune/F/status/<client>  retained presence, with a last will
"""

from __future__ import annotations

from dataclasses import dataclass

from .keys import validate_party_id

PREFIX = "cotune"


@dataclass(frozen=True)
class Topics:
    federation: str

    def __post_init__(self) -> None:
        validate_party_id(self.federation)  # same safe alphabet: it is a topic level too

    @property
    def root(self) -> str:
        return f"{PREFIX}/{self.federation}"

    def down(self, client: str) -> str:
        return f"{self.root}/down/{client}"

    def up(self, client: str) -> str:
        return f"{self.root}/up/{client}"

    def is_up(self, topic: str) -> bool:
        """Whether ``topic`` is one of this federation's up topics (any client's)."""
        return topic.startswith(f"{self.root}/up/")

    @property
    def bcast(self) -> str:
        return f"{self.root}/bcast"

    def status(self, client: str) -> str:
        return f"{self.root}/status/{client}"

    @property
    def up_wildcard(self) -> str:
        return f"{self.root}/up/+"

    @property
    def status_wildcard(self) -> str:
        return f"{self.root}/status/+"

    def shared_up(self, group: str) -> str:
        """Ingest workers of a scaled-out aggregator share the up topics (MQTT 5 shared
        subscriptions; Mosquitto also serves them to 3.1.1 clients)."""
        return f"$share/{group}/{self.up_wildcard}"

    def parse(self, topic: str) -> tuple[str, str | None]:
        """(kind, party) for a topic of this federation: ("up", "alice"), ("bcast", None)."""
        parts = topic.split("/")
        if len(parts) < 3 or parts[0] != PREFIX or parts[1] != self.federation:
            raise ValueError(f"topic {topic!r} is not in federation {self.federation!r}")
        kind = parts[2]
        if kind == "bcast" and len(parts) == 3:
            return kind, None
        if kind in ("down", "up", "status") and len(parts) == 4:
            return kind, parts[3]
        raise ValueError(f"unknown topic {topic!r}")
