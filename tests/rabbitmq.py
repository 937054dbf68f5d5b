"""A throw-away RabbitMQ cluster for the tests: N nodes on this host, MQTT plugin enabled.

Every node gets its own node name, ports (AMQP, Erlang distribution, MQTT), data, log, config
and enabled-plugins files under one temporary directory, and a private ``epmd`` port, so a
test cluster never meets a system RabbitMQ or another test run's cluster. The nodes share an
Erlang cookie (``.erlang.cookie`` in a HOME made for them). Clustering uses RabbitMQ's own
peer discovery (``cluster_formation.peer_discovery_backend = classic_config``): the first
node boots alone, the others boot with an empty database, find it and join, which saves the
``stop_app`` / ``join_cluster`` / ``start_app`` round trips of the command line tool (each
``rabbitmqctl`` call boots an Erlang VM, about a second). Users and permissions are imported
as one definitions document (``rabbitmqctl import_definitions``); they live in the cluster's
shared database, so a user made through node A logs in on node B.

The nodes run as the current user from the distribution's scripts directory
(``/usr/lib/rabbitmq/bin`` on Debian: the ``/usr/sbin`` wrappers switch to the ``rabbitmq``
user and its fixed directories). ``stop()`` stops every node (``rabbitmqctl stop``, then
SIGKILL of the node's process group) and the private epmd, and removes the directory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

_SCRIPT_DIRS = ("/usr/lib/rabbitmq/bin", "/usr/local/lib/rabbitmq/bin", "/opt/rabbitmq/sbin")


def find_rabbitmq() -> Path | None:
    """The directory holding ``rabbitmq-server`` and ``rabbitmqctl`` that run as the caller
    (not the distribution's user-switching wrappers), or None when RabbitMQ is not installed."""
    candidates = [Path(d) for d in _SCRIPT_DIRS]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for d in candidates:
        server, ctl = d / "rabbitmq-server", d / "rabbitmqctl"
        if server.is_file() and ctl.is_file() and "su rabbitmq" not in server.read_text(errors="replace"):
            return d
    return None


def rabbitmq_version(bindir: Path) -> str | None:
    """The server version from the install tree (``.../lib/rabbitmq_server-X.Y.Z``)."""
    for lib in sorted((bindir.parent / "lib").glob("rabbitmq_server-*")):
        return lib.name.split("-", 1)[1]
    return None


def password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class RabbitNode:
    name: str  # Erlang node name, e.g. cotune-a-1f2e@localhost
    amqp_port: int
    dist_port: int
    mqtt_port: int
    dir: Path
    proc: subprocess.Popen | None = None
    env: dict = field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.dir / "log" / f"{self.name}.log"

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for p in (self.log, self.dir / "stdout.log"):
            if p.exists():
                parts.append(f"--- {p.name}\n" + p.read_text(errors="replace")[-chars:])
        return "\n".join(parts)


class RabbitCluster:
    """``RabbitCluster(n).start()``: n clustered nodes; ``nodes[i].mqtt_port`` is node i's
    MQTT listener (plain TCP on 127.0.0.1, MQTT 3.1.1)."""

    def __init__(self, n: int = 2, bindir: Path | None = None, prefix: str = "cotune"):
        self.bindir = bindir or find_rabbitmq()
        if self.bindir is None:
            raise RuntimeError("rabbitmq-server is not installed")
        self.n, self.prefix = n, prefix
        self._layout()
        self.startup_s: float | None = None
        self.version = rabbitmq_version(self.bindir)

    # -- configuration ---------------------------------------------------------------------
    def _layout(self) -> None:
        """A fresh directory, node names and ports (a retried start gets new ones)."""
        self.root = Path(tempfile.mkdtemp(prefix="cotune-rabbitmq-", dir="/tmp"))
        tag = secrets.token_hex(3)
        ports = free_ports(3 * self.n + 1)
        self.epmd_port = ports[-1]
        self.nodes = [
            RabbitNode(f"{self.prefix}-{chr(ord('a') + i)}-{tag}@localhost", *ports[3 * i:3 * i + 3],
                       dir=self.root / chr(ord("a") + i))
            for i in range(self.n)
        ]
        self.home = self.root / "home"

    def _write_files(self) -> None:
        self.home.mkdir(parents=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16))
        cookie.chmod(0o400)
        admin = f"admin-{secrets.token_hex(4)}"
        seed = self.nodes[0]
        for node in self.nodes:
            # the other nodes discover the seed and join it, retrying while it boots (they all
            # start together); the seed itself forms a cluster of one
            join = "" if node is seed else (
                "cluster_formation.peer_discovery_backend = classic_config\n"
                f"cluster_formation.classic_config.nodes.1 = {seed.name}\n"
                "cluster_formation.discovery_retry_limit = 600\n"
                "cluster_formation.discovery_retry_interval = 200\n")
            (node.dir / "log").mkdir(parents=True)
            (node.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
            (node.dir / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n"
                f"mqtt.listeners.tcp.default = 127.0.0.1:{node.mqtt_port}\n"
                "mqtt.allow_anonymous = false\n"
                f"default_user = {admin}\n"
                f"default_pass = {secrets.token_urlsafe(16)}\n"
                f"{join}"
                # the tests' disks are small and shared: no free-disk alarm blocking publishers
                "disk_free_limit.absolute = 1MB\n"
                "vm_memory_high_watermark.relative = 0.8\n"
                "log.console = false\n"
                "log.file.level = info\n"
            )
            node.env = {
                **os.environ,
                "HOME": str(self.home),
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_NODENAME": node.name,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(node.amqp_port),
                "RABBITMQ_DIST_PORT": str(node.dist_port),
                "RABBITMQ_MNESIA_BASE": str(node.dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(node.dir / "log"),
                "RABBITMQ_CONFIG_FILE": str(node.dir / "rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.dir / "advanced.config"),  # absent
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.dir / "enabled_plugins"),
                "RABBITMQ_CONF_ENV_FILE": str(node.dir / "rabbitmq-env.conf"),  # absent
                "RABBITMQ_PID_FILE": str(node.dir / "rabbitmq.pid"),
                # two cores shared with other work: a small scheduler pool boots faster
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "+S 2:2 +sbwt none +sbwtdcpu none +sbwtdio none",
            }
            for var in ("RABBITMQ_ERLANG_COOKIE", "RABBITMQ_BASE", "RABBITMQ_HOME"):
                node.env.pop(var, None)

    # -- lifecycle -------------------------------------------------------------------------
    def _launch(self, node: RabbitNode) -> None:
        out = open(node.dir / "stdout.log", "wb")
        node.proc = subprocess.Popen([str(self.bindir / "rabbitmq-server")], env=node.env, cwd=node.dir,
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()

    def _wait_mqtt(self, node: RabbitNode, deadline: float) -> None:
        """A node's MQTT listener opens at the end of its boot (plugins start last)."""
        while not _port_open(node.mqtt_port):
            if node.proc.poll() is not None:
                raise RuntimeError(f"RabbitMQ node {node.name} exited with {node.proc.returncode}:\n"
                                   + node.log_tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {node.name} not up in time:\n" + node.log_tail())
            time.sleep(0.1)

    def start(self, timeout: float = 60.0, attempts: int = 2) -> RabbitCluster:
        """Start the nodes together and check that they form one cluster. A start that fails or
        takes longer than ``timeout`` is torn down and tried again with fresh ports and
        directories (a port taken meanwhile by another process, a slow boot on a busy host)."""
        t0 = time.monotonic()
        for attempt in range(attempts):
            try:
                self._start_once(time.monotonic() + timeout)
                break
            except BaseException:
                self.stop()
                if attempt + 1 == attempts:
                    raise
                self._layout()
        self.startup_s = round(time.monotonic() - t0, 2)
        return self

    def _start_once(self, deadline: float) -> None:
        self._write_files()
        for node in self.nodes:  # together: the others wait for the seed and join it
            self._launch(node)
        for node in self.nodes:
            self._wait_mqtt(node, deadline)
        running = self.running_nodes()
        if sorted(running) != sorted(n.name for n in self.nodes):
            raise RuntimeError(f"RabbitMQ nodes did not form one cluster: running {running}\n"
                               + "\n".join(n.log_tail() for n in self.nodes))

    def ctl(self, *args: str, node: int = 0, timeout: float = 60.0) -> str:
        """``rabbitmqctl -n <node> ARGS``; returns stdout, raises with the output on failure."""
        n = self.nodes[node]
        proc = subprocess.run([str(self.bindir / "rabbitmqctl"), "-n", n.name, *args], env=n.env,
                              capture_output=True, text=True, timeout=timeout, cwd=n.dir)
        if proc.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stdout}{proc.stderr}")
        return proc.stdout

    def running_nodes(self, node: int = 0) -> list[str]:
        doc = json.loads(self.ctl("cluster_status", "--formatter", "json", node=node))
        return list(doc.get("running_nodes", []))

    def add_users(self, users: dict[str, str], topic_permissions: dict[str, tuple[str, str]] | None = None,
                  node: int = 0) -> None:
        """Create users (name -> password) with full rights on vhost "/", in one call.
        ``topic_permissions``: name -> (write regex, read regex) on ``amq.topic`` (the MQTT
        plugin's exchange; MQTT topic levels become ``.``-separated routing keys); RabbitMQ
        expands ``{username}`` and ``{client_id}`` in them."""
        defs = {
            "users": [{"name": u, "password_hash": password_hash(p), "tags": "",
                       "hashing_algorithm": "rabbit_password_hashing_sha256"} for u, p in users.items()],
            "permissions": [{"user": u, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
                            for u in users],
            "topic_permissions": [{"user": u, "vhost": "/", "exchange": "amq.topic", "write": w, "read": r}
                                  for u, (w, r) in (topic_permissions or {}).items()],
        }
        path = self.root / f"definitions-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps(defs))
        self.ctl("import_definitions", str(path), node=node)

    def stop_node(self, i: int, timeout: float = 30.0) -> None:
        node = self.nodes[i]
        if node.proc is None:
            return
        if node.proc.poll() is None:
            try:
                self.ctl("stop", node=i, timeout=timeout)
            except (RuntimeError, subprocess.TimeoutExpired, OSError):
                pass
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # the node's process group: the shell script, beam.smp, erl_child_setup, inet_gethost
        try:
            os.killpg(node.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            node.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop(self) -> None:
        try:
            # the seed last: the others leave a running cluster
            for i in reversed(range(len(self.nodes))):
                self.stop_node(i)
        finally:
            self._kill_epmd()
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_epmd(self) -> None:
        """The private epmd the first node started on ``epmd_port`` (a daemon of its own)."""
        epmd = shutil.which("epmd") or next(iter(Path("/usr/lib/erlang").glob("erts-*/bin/epmd")), None)
        if epmd is not None:
            env = {**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)}
            subprocess.run([str(epmd), "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10,
                           env=env)
