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
        yield provision(root / "fed", "testfed", FED_CLIENTS, port=port, password_port=pport,
                        aggregator_instances=1)
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


# --------------------------------------------------------------------------- PostgreSQL


def find_postgres_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: on PATH, or Debian's versioned directory
    (/usr/lib/postgresql/<major>/bin, the newest major), else None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        if initdb.parent.joinpath("pg_ctl").exists() and initdb.parents[1].name.isdigit():
            candidates.append((int(initdb.parents[1].name), initdb.parent))
    return max(candidates)[1] if candidates else None


class PostgresServer:
    """A throw-away PostgreSQL cluster: initdb into a temporary directory, the server on a free
    port of 127.0.0.1 with its unix socket in that directory, trust authentication, superuser
    ``cotune``. PostgreSQL refuses to run as root: under root every server command runs as the
    ``postgres`` system user (created by the distribution's package), which owns the directory.

    ``fsync`` is off: the tests kill clients, never the server, so the server's own crash
    safety is not what they measure, and the shared test machine stays fast."""

    DB = "cotune_test"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = _broker_dir()
        self.data = self.root / "data"
        self.port = free_ports(1)[0]
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            import pwd

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL")
            runuser = shutil.which("runuser")
            if runuser is None:
                shutil.rmtree(self.root, ignore_errors=True)
                pytest.skip("running as root and runuser is missing to run PostgreSQL as 'postgres'")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
            self._prefix = [runuser, "-u", "postgres", "--"]
        self._schemas = 0

    def _run(self, *args: str, timeout: float = 120) -> None:
        import subprocess

        proc = subprocess.run(
            [*self._prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=self.root
        )
        if proc.returncode != 0:
            log = self.root / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}): {proc.stderr}{tail}")

    def start(self) -> PostgresServer:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "cotune", "--auth=trust",
            "--no-sync", "--no-instructions", "--locale=C", "--encoding=UTF8",
        )  # fmt: skip
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
            " -c fsync=off -c full_page_writes=off -c max_connections=40"
        )
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
            "-o", opts, "-w", "-t", "60", "start",
        )  # fmt: skip
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.DB}")
        return self

    def dsn(self, dbname: str = DB, schema: str | None = None) -> str:
        from urllib.parse import quote

        url = f"postgresql://cotune@/{dbname}?host={quote(str(self.root), safe='/')}&port={self.port}"
        if schema:
            url += "&options=" + quote(f"-csearch_path={schema}", safe="")
        return url

    def new_schema(self) -> str:
        """A DSN whose search_path is a new, empty schema: one federation ledger per test."""
        import psycopg

        self._schemas += 1
        name = f"t{os.getpid()}_{self._schemas}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {name}")
        return self.dsn(schema=name)

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (see :class:`PostgresServer`); skipped with the
    reason when PostgreSQL or psycopg is not installed (.ci/run installs both)."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install '.[postgres]')")
    bindir = find_postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); CI installs it")
    server = PostgresServer(bindir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def postgresql_dsn(postgresql: PostgresServer) -> str:
    """DSN of a fresh, empty schema on the session's PostgreSQL server."""
    return postgresql.new_schema()


class StateBackend:
    """Where a test's federation ledger lives: a SQLite file or a PostgreSQL schema; the
    checkpoint directory is a local directory in both cases."""

    def __init__(self, name: str, target: str, checkpoints: Path | None) -> None:
        self.name, self.target, self.checkpoints = name, target, checkpoints

    def open(self, **kw):
        from aggregator.state import open_store

        kw.setdefault("checkpoints", self.checkpoints)
        return open_store(self.target, **kw)

    def sql(self, statement: str) -> None:
        """Run one statement on the ledger behind the store's back (tests tamper with it)."""
        if self.name == "sqlite":
            import sqlite3

            db = sqlite3.connect(self.target)
            try:
                db.execute(statement)
                db.commit()
            finally:
                db.close()
        else:
            import psycopg

            with psycopg.connect(self.target, autocommit=True) as conn:
                conn.execute(statement)


@pytest.fixture(params=["sqlite", "postgresql"])
def state_backend(request, tmp_path: Path) -> StateBackend:
    """The ledger backends, one test run each: SQLite (a file in tmp_path, checkpoints beside
    it by default) and PostgreSQL (a fresh schema, checkpoints in tmp_path)."""
    if request.param == "sqlite":
        return StateBackend("sqlite", str(tmp_path / "state.db"), None)
    dsn = request.getfixturevalue("postgresql_dsn")
    return StateBackend("postgresql", dsn, tmp_path / "checkpoints")
