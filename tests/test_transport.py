"""Transport behaviour that needs no Mosquitto: the embedded (MQTT 3.1.1-only) broker."""

from __future__ import annotations

import os

from wire_helpers import fixed_federation

from bridge.endpoint import Endpoint
from bridge.messages import Note
from bridge.transport import BrokerConfig


def test_auto_protocol_falls_back_to_311_and_the_wire_works(embedded_broker):
    ids, directory = fixed_federation(("alice",))
    cfg = BrokerConfig(host=embedded_broker.host, port=embedded_broker.port)  # protocol="auto"
    with Endpoint(ids["aggregator"], directory, cfg) as agg, Endpoint(ids["alice"], directory, cfg) as alice:
        assert alice.transport.protocol_in_use == "3.1.1"
        alice.send("aggregator", Note("hi", {"n": 1}), wait=10)
        got = agg.recv(timeout=10)
        assert got.sender == "alice" and got.message == Note("hi", {"n": 1})
        data = os.urandom(1_500_000)
        ref = agg.broadcast_blob(["alice"], data, round=0)
        assert alice.fetch_blob(ref, "aggregator", timeout=30).read() == data
