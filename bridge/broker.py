"""Broker launchers: a Mosquitto subprocess running a provisioned federation's config (TLS, mTLS,
ACL, persistence), and an in-process amqtt broker for demos and tests on a machine without
Mosquitto.

Neither broker sees model updates in clear: every payload is an end-to-end encrypted and signed
envelope, so the choice of broker decides who may connect and publish, not who may read.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

from .errors import TransportError

log = logging.getLogger(__name__)

_LIVE: weakref.WeakSet = weakref.WeakSet()  # started brokers, stopped at interpreter exit


def find_mosquitto() -> str | None:
    """Path of a mosquitto binary: $COTUNE_MOSQUITTO, then PATH, then the usual sbin places
    (Debian installs it in /usr/sbin, which is not on a normal user's PATH)."""
    env = os.environ.get("COTUNE_MOSQUITTO")
    if env:
        return env if os.access(env, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found:
        return found
    for cand in (
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
        "/usr/local/opt/mosquitto/sbin/mosquitto",
    ):
        if os.access(cand, os.X_OK):
            return cand
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (another process may still take it before use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((_probe_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def _probe_host(host: str) -> str:
    # a wildcard bind address is reachable through loopback
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def read_listeners(conf_path: str | os.PathLike) -> list[tuple[str, int]]:
    """(host, port) of each ``listener`` line of a Mosquitto config, in order."""
    out = []
    for line in Path(conf_path).read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "listener":
            try:
                out.append((parts[2] if len(parts) > 2 else "0.0.0.0", int(parts[1])))
            except ValueError:
                continue
    return out


# ---------------------------------------------------------------------------------------------
# Mosquitto


class MosquittoBroker:
    """A Mosquitto process for one config file.

    The log (Mosquitto's stdout and stderr) goes to ``mosquitto.log`` beside the config unless
    ``log_path`` is given; each start appends to it. ``host``/``port`` default to the config's first
    ``listener``; start() waits until every listener of the config accepts TCP connections.
    """

    def __init__(
        self,
        conf_path: str | os.PathLike,
        binary: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        log_path: str | os.PathLike | None = None,
        start_timeout: float = 10.0,
    ):
        self.conf_path = Path(conf_path).resolve()
        if not self.conf_path.is_file():
            raise TransportError(
                f"Mosquitto config {self.conf_path} does not exist; provision the "
                "federation first (cotune provision)"
            )
        self.binary = binary or find_mosquitto()
        if not self.binary:
            raise TransportError(
                "mosquitto is not installed (apt-get install mosquitto, brew "
                "install mosquitto) and COTUNE_MOSQUITTO is not set"
            )
        listeners = read_listeners(self.conf_path)
        if port is not None:
            listeners = [(host or "127.0.0.1", int(port))]
        elif not listeners:
            raise TransportError(f"{self.conf_path} has no 'listener' line; pass host and port")
        self.listeners = listeners
        self.host = _probe_host(host or listeners[0][0])
        self.port = listeners[0][1]
        self.log_path = Path(log_path) if log_path else self.conf_path.with_name("mosquitto.log")
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> MosquittoBroker:
        if self.running:
            return self
        for h, p in self.listeners:
            if port_open(h, p):
                raise TransportError(
                    f"port {p} on {_probe_host(h)} is already in use by another "
                    f"process; stop it or provision another port"
                )
        with open(self.log_path, "ab") as fh:
            fh.write(f"--- cotune: starting {self.binary} -c {self.conf_path}\n".encode())
            # Own session: a Ctrl-C meant for the caller must not kill the broker behind its back.
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.conf_path.parent,
                start_new_session=True,
            )
        _LIVE.add(self)
        self._wait_ready()
        _write_pid_file(self.pid_path, self._proc.pid)
        log.info(
            "mosquitto pid %d listening on %s",
            self._proc.pid,
            ", ".join(f"{h}:{p}" for h, p in self.listeners),
        )
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        pending = list(self.listeners)
        while pending:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise TransportError(
                    f"mosquitto exited with status {code} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if port_open(*pending[0], timeout=0.2):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self.kill()
                raise TransportError(
                    f"mosquitto did not open {pending[0][0]}:{pending[0][1]} "
                    f"within {self.start_timeout:.0f} s; last lines of "
                    f"{self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM (Mosquitto then saves its persistence file), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        _remove_pid_file(self.pid_path, proc.pid)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, for tests of reconnects and resumed transfers."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _remove_pid_file(self.pid_path, proc.pid)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> MosquittoBroker:
        self.stop()
        return self.start()

    @property
    def pid_path(self) -> Path:
        """``mosquitto.pid`` beside the config while this launcher's broker runs: how
        :func:`reload_running_broker` (``cotune revoke``) finds it."""
        return self.conf_path.with_name("mosquitto.pid")

    def reload(self) -> None:
        """SIGHUP: Mosquitto 2.0 re-reads the password file, the ACL and the listeners' CRL
        (``crlfile``; checked against 2.0.11 in tests/test_enroll.py), e.g. after add_client or
        a revocation. Open connections stay open (the ACL applies to them at once)."""
        if not self.running:
            raise TransportError("mosquitto is not running")
        self._proc.send_signal(signal.SIGHUP)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        where = ", ".join(f"mqtts://{_probe_host(h)}:{p}" for h, p in self.listeners)
        return (
            f"mosquitto (pid {self.pid}) on {where} (TLS; client certificate required on the "
            f"first listener); config {self.conf_path}; log {self.log_path}"
        )


def reload_running_broker(conf_path: str | os.PathLike) -> int | None:
    """SIGHUP the Mosquitto that a :class:`MosquittoBroker` (``cotune broker``) started with
    ``conf_path``, found through its pid file; the pid, or None when none runs (a broker
    started otherwise, e.g. by systemd, needs ``systemctl reload mosquitto`` or ``kill -HUP``).
    Where /proc exists, the pid must still be a mosquitto running this config."""
    conf = Path(conf_path).resolve()
    pid_path = conf.with_name("mosquitto.pid")
    try:
        pid = int(pid_path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    cmdline = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return None  # gone
        if str(conf).encode() not in args:
            return None  # the pid was reused by another process
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return None
    except PermissionError as exc:
        raise TransportError(
            f"cannot signal mosquitto (pid {pid}): {exc}; run `kill -HUP {pid}` as its owner"
        ) from exc
    return pid


def _write_pid_file(path: Path, pid: int) -> None:
    try:
        path.write_text(f"{pid}\n")
    except OSError as exc:  # a read-only config directory: reloads must then be sent by hand
        log.warning("cannot write %s: %s", path, exc)


def _remove_pid_file(path: Path, pid: int) -> None:
    try:
        if path.read_text().strip() == str(pid):
            path.unlink()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------
# Embedded amqtt broker

EMBEDDED_WARNING = (
    "using the embedded amqtt broker on mqtt://{host}:{port}: plain TCP, MQTT 3.1.1 only, no TLS, "
    "no client authentication, no ACL. Model updates stay confidential and authenticated because "
    "every payload is an end-to-end encrypted, signed envelope, so this is fine for demos and "
    "tests on one machine. It is NOT for production: anyone who can reach the port can connect, "
    "subscribe to every topic (seeing who talks when and how much) and publish junk or floods. "
    "Deploy Mosquitto with the provisioned mTLS config instead (`cotune broker --federation-dir DIR`)."
)


class EmbeddedBroker:
    """amqtt in this process, on a background thread with its own event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, start_timeout: float = 10.0):
        self.host = host
        self.port = int(port)
        self.start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        try:
            import amqtt.broker  # noqa: F401  (fail here, in the caller's thread, if missing)
        except ImportError as exc:
            raise TransportError(
                f"the embedded broker needs amqtt (pip install amqtt): {exc}"
            ) from exc
        _quiet_amqtt_logging()
        if self.port == 0:
            self.port = free_port(self.host)
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=self._run, name="cotune-embedded-broker", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(self.start_timeout) or self._error is not None:
            self.stop()
            raise TransportError(
                f"embedded broker did not start on {self.host}:{self.port}: "
                f"{self._error or 'timeout'}"
            )
        _LIVE.add(self)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); a thread has nobody else to tell
            self._error = exc
        finally:
            # amqtt may leave per-connection tasks behind on shutdown: cancel them so that closing
            # the loop frees every socket.
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._ready.set()

    async def _serve(self) -> None:
        from amqtt.broker import Broker

        self._stop_event = asyncio.Event()
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            # no $SYS publisher and no packet logger: less work, quieter logs
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        broker = Broker(config, loop=asyncio.get_running_loop())
        await broker.start()
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await broker.shutdown()

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, ev = self._thread, self._loop, self._stop_event
        self._thread = None
        if thread is None:
            return
        if loop is not None and ev is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # the loop closed in between
                pass
        thread.join(timeout)
        if thread.is_alive():
            raise TransportError(f"embedded broker thread did not stop within {timeout:.0f} s")
        self._loop = self._stop_event = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        return f"embedded amqtt broker on mqtt://{self.host}:{self.port} (plain TCP, MQTT 3.1.1)"


def _quiet_amqtt_logging() -> None:
    # amqtt logs every connection at INFO and refused or half-open connections at WARNING; keep
    # its errors only, and leave a level the application chose explicitly alone.
    for name, level in (("amqtt", logging.ERROR), ("transitions", logging.WARNING)):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET:
            lg.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Choosing and running a broker


def start_broker(
    fed_dir: str | os.PathLike | None,
    embedded: bool = False,
    *,
    host: str | None = None,
    port: int | None = None,
):
    """Start the federation's broker: Mosquitto with ``FED_DIR/broker/mosquitto.conf`` when that
    config and a mosquitto binary exist and ``embedded`` is false, else the embedded broker
    (``host``/``port`` apply to it; port 0 or None picks a free port)."""
    conf = Path(fed_dir) / "broker" / "mosquitto.conf" if fed_dir else None
    if not embedded:
        binary = find_mosquitto()
        if conf is not None and conf.is_file() and binary:
            from .provision import FederationPaths, check_broker_access

            check_broker_access(FederationPaths.open(fed_dir))
            return MosquittoBroker(conf, binary).start()
        why = (
            "mosquitto is not installed"
            if not binary
            else f"{conf} does not exist"
            if conf is not None
            else "no federation directory given"
        )
        log.warning("cotune: %s; falling back to the embedded broker", why)
    broker = EmbeddedBroker(host or "127.0.0.1", port or 0).start()
    log.warning("cotune: " + EMBEDDED_WARNING.format(host=broker.host, port=broker.port))
    return broker


def run_broker_cli(
    fed_dir: str | None, embedded: bool, host: str | None = None, port: int | None = None
) -> int:
    """``cotune broker``: start, say where it listens, block until SIGINT/SIGTERM. Exit status 0
    on a requested stop, 1 if the broker died, 2 if it could not start."""
    from .errors import BridgeError

    # Handlers first: a SIGTERM that arrives while the broker starts must still stop it cleanly.
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, lambda *_: stop.set())
    try:
        # a stable, well-known port for an embedded broker people point clients at by hand
        broker = start_broker(fed_dir, embedded, host=host, port=1883 if port is None else port)
    except BridgeError as exc:
        print(f"cotune broker: {exc}", file=sys.stderr)
        _restore(previous)
        return 2
    if isinstance(broker, MosquittoBroker) and port is not None and port != broker.port:
        print(
            f"cotune broker: note: --port {port} ignored, the federation config says {broker.port}",
            file=sys.stderr,
        )
    print(f"cotune broker: {broker.describe()}; Ctrl-C to stop", flush=True)
    try:
        while not stop.wait(0.5):
            if not broker.running:
                tail = broker.log_tail() if isinstance(broker, MosquittoBroker) else ""
                print(f"cotune broker: the broker stopped unexpectedly\n{tail}", file=sys.stderr)
                return 1
    finally:
        broker.stop()
        _restore(previous)
    print("cotune broker: stopped", flush=True)
    return 0


def _restore(handlers: dict) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@atexit.register
def _stop_all() -> None:
    for b in list(_LIVE):
        try:
            b.stop()
        except Exception:  # exiting anyway; a leftover process is logged by the OS, not by us
            pass
