"""Shared fixtures: provisioned federations and real brokers (Mosquitto, embedded amqtt)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from bridge.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto
from bridge.provision import FederationPaths, provision

FED_CLIENTS = ["alice", "bob", "carol"]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all sockets held open together, so no duplicates)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _broker_dir() -> Path:
    # Under /tmp and mode 0755: a root-started Mosquitto drops to the 'mosquitto' user, which
    # must traverse every parent (pytest's tmp_path is 0700 under root's private tree).
    d = Path(tempfile.mkdtemp(prefix="cotune-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def make_federation() -> Iterator[Callable[..., FederationPaths]]:
    """Factory: provision(...) into a fresh broker-traversable directory on free ports.
    Keyword arguments go to provision(); directories are removed at teardown."""
    made: list[Path] = []

    def make(federation: str = "testfed", clients=FED_CLIENTS, **kw) -> FederationPaths:
        root = _broker_dir()
        made.append(root)
        port, pport = free_ports(2)
        kw.setdefault("port", port)
        kw.setdefault("password_port", pport)
        return provision(root / "fed", federation, list(clients), **kw)

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def federation() -> Iterator[FederationPaths]:
    """Federation "testfed" (aggregator + alice, bob, carol), mTLS on a free port and a password
    listener on another; shared by the tests of one module."""
    root = _broker_dir()
    port, pport = free_ports(2)
    try:
        yield provision(root / "fed", "testfed", FED_CLIENTS, port=port, password_port=pport)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mosquitto(federation: FederationPaths) -> Iterator[MosquittoBroker]:
    """Real Mosquitto running the federation's config; stopped at teardown."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    broker = MosquittoBroker(federation.mosquitto_conf).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def embedded_broker() -> Iterator[EmbeddedBroker]:
    """In-process amqtt broker on a free port."""
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """Directory of the default tiny Llama (weights + tokenizer), built once per session."""
    from tests.tiny_models import session_model

    return session_model("llama", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory):
    """Directory of the default tiny GPT-2 (weights + tokenizer), built once per session."""
    from tests.tiny_models import session_model

    return session_model("gpt2", tmp_path_factory)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a shared, busy machine two
    spinning threads made each step ~20x slower. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory):
    """A wider, deeper tiny Llama with the SAME tokenizer as ``tiny_llama_path`` (the tokenizer
    is trained deterministically on the same corpus): the "LLM" of FedCoLLM/FedPT tests."""
    from tests.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llm"), hidden=96, layers=3, heads=4, kv_heads=2,
                           intermediate=192, seed=1)


@pytest.fixture(scope="session")
def tiny_llm6_path(tmp_path_factory):
    """A 6-layer tiny Llama with the same tokenizer as ``tiny_llama_path``: deep enough for a
    FedBiOT emulator that really drops layers next to a 2-layer adapter."""
    from tests.tiny_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llm6"), hidden=64, layers=6, heads=4, kv_heads=2,
                           intermediate=128, seed=2)
