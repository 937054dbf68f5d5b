"""Provisioning of one federation: a private CA, the broker's TLS/mTLS configuration (with a
certificate revocation list), its ACL and password file, the client registry, and one directory
per party that holds what that party needs and nothing of anyone else's.

Layout (DIR is the federation directory)::

    DIR/federation.json        public: broker address, packet limit, the aggregator's public
                               identity and certificate, the registry's file name
    DIR/registry.db            every party's certified public keys and status (bridge.registry)
    DIR/ca/ca.crt ca.key       the federation CA (key 0600: needed to enroll, add and revoke)
    DIR/ca/ca.crl              revoked certificates, read by the broker (``crlfile``)
    DIR/ca/enroll.db           one-time enrollment tokens, hashed (bridge.enroll; 0600)
    DIR/broker/server.crt server.key    broker certificate (SAN: host, localhost, loopbacks, extras)
    DIR/broker/mosquitto.conf acl passwd
    DIR/broker/data/           Mosquitto persistence
    DIR/parties/<id>/          config.json identity.json client.crt client.key ca.crt federation.json

Everything is O(1) per party: a client's ``federation.json`` names the aggregator only (its keys
and its certificate, which the client checks against ``ca.crt``), the same few KB for every
client; the aggregator's names the registry, from which it reads every active client
(:class:`bridge.registry.RegistryDirectory`, which follows enrollments and revocations while it
runs). The ACL grants by pattern (``%u`` = party id) and lists only the aggregator and revoked
parties, so adding a party rewrites no file that grows with the fleet.

Who makes the keys: :func:`provision` and :func:`add_client` generate the listed parties' keys
centrally, a convenience for labs, tests and demos (whoever runs it holds every private key).
In production, provision with no clients (or just the ones the operator runs) and let each device
enroll (:mod:`bridge.enroll`): the device makes its keys, the CA signs a CSR, and no private key
leaves the device.

A client's directory is self-contained (its config refers to its files by relative paths), so it
can be copied to a device as is. The aggregator's refers to ``../../registry.db``; to run the
aggregator on another machine, set ``registry`` in its ``federation.json`` to where the registry
is (absolute paths are allowed).

Transport security is one hop (party <-> broker); the envelope protects end to end. The broker
identifies a party by its certificate CN (``use_identity_as_username``), so the ACL's ``%u`` is the
party id and cannot be spoofed by choosing an MQTT username or client id.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import ipaddress
import logging
import os
import pwd
import secrets
import shutil
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .ca import certified_identity, common_name, envelope_keys, issue, load_ca, make_ca, make_crl
from .errors import ProvisioningError
from .keys import Directory, Identity, PublicIdentity, read_json, validate_party_id, write_json
from .registry import Registry, RegistryDirectory
from .topics import Topics

#: Bytes Mosquitto's ``max_packet_size`` allows above ``max_packet_bytes`` (the largest payload a
#: sender produces): fixed header, topic name, MQTT 5 properties.
PACKET_HEADROOM = 16 * 1024
#: Mosquitto's own default for ``mosquitto_passwd`` (``$7$`` = PBKDF2-SHA512).
PBKDF2_ITERATIONS = 101
#: Debian/Ubuntu packages run the broker as this user after it starts as root.
BROKER_USER = "mosquitto"
CERT_DAYS = 3650

_FILE_MODE = 0o644
_SECRET_MODE = 0o600

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Paths


@dataclass(frozen=True)
class FederationPaths:
    """Where the files of one provisioned federation live. Build it with :meth:`open`."""

    root: Path
    federation: str
    host: str
    port: int
    password_port: int | None = None

    @classmethod
    def open(cls, root: str | os.PathLike) -> FederationPaths:
        root = Path(root).resolve()
        data = read_json(root / "federation.json")
        try:
            broker = data["broker"]
            pport = broker.get("password_port")
            return cls(
                root,
                data["federation"],
                broker["host"],
                int(broker["port"]),
                None if pport is None else int(pport),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProvisioningError(
                f"{root / 'federation.json'}: bad federation file ({exc})"
            ) from exc

    @property
    def federation_json(self) -> Path:
        return self.root / "federation.json"

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_cert(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def server_cert(self) -> Path:
        return self.broker_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.broker_dir / "server.key"

    @property
    def mosquitto_conf(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def passwd(self) -> Path:
        return self.broker_dir / "passwd"

    @property
    def data_dir(self) -> Path:
        return self.broker_dir / "data"

    @property
    def broker_log(self) -> Path:
        return self.broker_dir / "mosquitto.log"

    @property
    def crl(self) -> Path:
        return self.ca_dir / "ca.crl"

    @property
    def enroll_db(self) -> Path:
        return self.ca_dir / "enroll.db"

    @property
    def registry(self) -> Path:
        return self.root / "registry.db"

    @property
    def parties_dir(self) -> Path:
        return self.root / "parties"

    def party_dir(self, party_id: str) -> Path:
        validate_party_id(party_id)
        return self.parties_dir / party_id

    def party_config(self, party_id: str) -> Path:
        return self.party_dir(party_id) / "config.json"

    def directory(self) -> Directory:
        """Every active party, from the registry (kept current; see RegistryDirectory)."""
        return _load_federation_directory(self.federation_json)

    @property
    def topics(self) -> Topics:
        return Topics(self.federation)

    def broker_files(self) -> list[Path]:
        """Every path the broker process reads (or, for ``data_dir``, writes)."""
        return [
            self.mosquitto_conf,
            self.acl,
            self.passwd,
            self.ca_cert,
            self.crl,
            self.server_cert,
            self.server_key,
            self.data_dir,
        ]


# ---------------------------------------------------------------------------------------------
# Party configuration


@dataclass(frozen=True)
class PartyConfig:
    """One party's view of the federation, with paths resolved and keys loaded."""

    path: Path  # the config.json it was read from
    federation: str
    party_id: str
    role: str
    host: str
    port: int
    identity: Identity
    directory: Directory
    max_packet_bytes: int
    # TLS files; all None when the config says "tls": null (plain TCP, e.g. the embedded broker)
    ca_cert: Path | None
    client_cert: Path | None
    client_key: Path | None
    federation_file: Path
    password: str | None = None
    password_port: int | None = None

    @property
    def tls(self) -> bool:
        return self.ca_cert is not None

    @property
    def topics(self) -> Topics:
        return Topics(self.federation)

    @property
    def aggregator_id(self) -> str:
        return self.directory.aggregator()


def load_party_config(path: str | os.PathLike, *, strict: bool = False) -> PartyConfig:
    """Read ``parties/<id>/config.json`` (or the party directory holding it) and check that the
    identity, directory and TLS files it names exist and agree with each other: the identity
    is the one the party's certificate certifies, and (for a client) the aggregator's keys are
    the ones the aggregator's certificate certifies under ``ca.crt``. The TLS key must load
    and match the certificate; a key file readable by others is refused with ``strict`` and
    logged as a warning otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    path = path.resolve()
    data = read_json(path)
    base = path.parent

    def need(obj: dict, key: str, where: str = ""):
        if not isinstance(obj, dict) or key not in obj or obj[key] is None:
            raise ProvisioningError(f"{path}: missing {where}{key!r}; re-provision this party")
        return obj[key]

    def existing(rel: str, what: str) -> Path:
        p = (base / rel).resolve()
        if not p.is_file():
            raise ProvisioningError(
                f"{path}: {what} file {p} does not exist; copy the whole party "
                "directory, or re-provision this party"
            )
        return p

    federation = need(data, "federation")
    party_id = need(data, "party_id")
    role = need(data, "role")
    broker = need(data, "broker")
    host = need(broker, "host", "broker.")
    try:
        port = int(need(broker, "port", "broker."))
        pport = broker.get("password_port")
        pport = None if pport is None else int(pport)
        max_packet = need(data, "max_packet_bytes")
        if isinstance(max_packet, bool) or not isinstance(max_packet, int) or max_packet < 1024:
            raise ProvisioningError(f"{path}: max_packet_bytes must be an integer >= 1024, got {max_packet!r}")
    except (TypeError, ValueError) as exc:
        raise ProvisioningError(f"{path}: bad number ({exc})") from exc
    tls = broker.get("tls")
    if tls is None:
        ca = cert = key = None
    else:
        ca = existing(need(tls, "ca", "broker.tls."), "CA certificate")
        cert = existing(need(tls, "cert", "broker.tls."), "client certificate")
        key = existing(need(tls, "key", "broker.tls."), "client key")
    identity = Identity.load(existing(need(data, "identity"), "identity"))
    fed_file = existing(need(data, "federation_file"), "federation")
    fed_doc = read_json(fed_file)

    # Cross-checks: a config mixed up from two parties or two federations must not load.
    if identity.party_id != party_id or identity.role != role:
        raise ProvisioningError(
            f"{path}: identity file is for {identity.party_id!r} "
            f"({identity.role}), config is for {party_id!r} ({role})"
        )
    if fed_doc.get("federation") != federation:
        raise ProvisioningError(
            f"{path}: federation file is for {fed_doc.get('federation')!r}, config is for "
            f"{federation!r}"
        )
    ca_cert = _load_cert(ca) if ca is not None else None
    if cert is not None:
        mine = _load_cert(cert)
        if common_name(mine) != party_id:
            raise ProvisioningError(
                f"{path}: client certificate is for {common_name(mine)!r}, not {party_id!r}"
            )
        _check_private_key(key, mine, strict=strict)
        bound = envelope_keys(mine, party_id)
        if bound is not None and bound != identity.public:
            raise ProvisioningError(
                f"{path}: the certificate certifies other envelope keys than identity.json "
                "holds; the party was re-provisioned or re-enrolled elsewhere"
            )
    directory = _load_federation_directory(fed_file, fed_doc)
    if directory.federation != federation:
        raise ProvisioningError(
            f"{path}: federation file is for {directory.federation!r}, config is for {federation!r}"
        )
    if party_id in directory:
        if directory.recipient(party_id) != identity.public:
            raise ProvisioningError(
                f"{path}: the directory's public keys for {party_id!r} do not "
                "match this identity; the party was re-provisioned elsewhere"
            )
    elif role == "client" and not isinstance(directory, RegistryDirectory):
        directory = directory.with_party(identity.public)  # a client knows itself + aggregator
    else:
        raise ProvisioningError(
            f"{path}: party {party_id!r} is not in the federation directory; "
            "copy the current federation.json from the operator"
        )
    agg_id = directory.aggregator()  # exactly one, or ProvisioningError
    agg_pem = fed_doc.get("aggregator_cert")
    if agg_pem and ca_cert is not None and agg_id != party_id:
        certified = certified_identity(_parse_cert(agg_pem.encode()), ca_cert, agg_id)
        if certified != directory.recipient(agg_id):
            raise ProvisioningError(
                f"{fed_file}: the aggregator's keys are not the ones its certificate certifies"
            )
    return PartyConfig(
        path=path,
        federation=federation,
        party_id=party_id,
        role=role,
        host=host,
        port=port,
        identity=identity,
        directory=directory,
        max_packet_bytes=max_packet,
        ca_cert=ca,
        client_cert=cert,
        client_key=key,
        federation_file=fed_file,
        password=data.get("password"),
        password_port=pport,
    )


def _load_federation_directory(path: Path, doc: dict | None = None) -> Directory:
    """The directory a federation file describes: the registry's (every active party, kept
    current) when it names one, else the static ``directory`` it holds."""
    data = read_json(path) if doc is None else doc
    if data.get("registry"):
        return Registry(path.parent / data["registry"]).directory()
    if "directory" not in data:
        raise ProvisioningError(f"{path}: no 'directory' in federation file")
    directory = Directory.from_json(data["directory"])
    if directory.federation != data.get("federation", directory.federation):
        raise ProvisioningError(f"{path}: directory is for another federation")
    return directory


class InsecureKeyFile(ProvisioningError):
    """A private key file others can read (refused with ``strict``; a warning otherwise)."""

    code = "insecure_key"


def _check_private_key(path: Path, cert: x509.Certificate, *, strict: bool) -> None:
    """The TLS key must load and belong to the certificate (a corrupt or foreign key would
    only show up as an SSL error at connect time), and should not be readable by others."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(f"{path}: not a usable PEM private key ({exc})") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if key.public_key().public_bytes(pem, spki) != cert.public_key().public_bytes(pem, spki):
        raise ProvisioningError(f"{path}: this key does not belong to the party's certificate")
    if os.name != "nt" and path.stat().st_mode & 0o077:
        msg = (f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); "
               f"chmod 600 it")
        if strict:
            raise InsecureKeyFile(msg)
        log.warning("%s", msg)


def _load_cert(path: Path) -> x509.Certificate:
    return _parse_cert(path.read_bytes(), path)


def _parse_cert(pem: bytes, where: object = "certificate") -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ProvisioningError(f"{where}: not a PEM certificate ({exc})") from exc


# ---------------------------------------------------------------------------------------------
# Provisioning


def provision(
    out_dir: str | os.PathLike,
    federation: str,
    clients: Sequence[str],
    aggregator_id: str = "aggregator",
    host: str = "127.0.0.1",
    port: int = 8883,
    max_packet_bytes: int = 1_048_576,
    extra_hosts: Iterable[str] = (),
    *,
    force: bool = False,
    password_port: int | None = None,
    bind_host: str | None = None,
    cert_days: int = CERT_DAYS,
    check_access: bool = True,
    aggregator_instances: int = 0,
) -> FederationPaths:
    """Write a new federation directory (see the module docstring) and return its paths.

    ``aggregator_instances``: broker identities for that many aggregator ingest workers
    (certificates ``<aggregator>~ingest-<k>`` in the aggregator's folder, ``instances/``). The
    broker forces every connection's client id to its certificate identity, so two processes of
    the aggregator need two identities (they share the envelope keys).

    ``password_port`` adds a second TLS listener that authenticates with the per-party passwords
    from the password file instead of client certificates (for clients that cannot do mTLS).
    ``host`` is the name parties dial; the broker listens on ``bind_host``, by default on ``host``
    when that is an IP address or localhost, and on every interface for a DNS name (which often
    points at a load balancer or a NAT address rather than at a local interface).

    When run as root with a ``mosquitto`` user present, the broker's files are handed to that user
    and, unless ``check_access`` is false, every parent directory is checked to be traversable by
    it (ProvisioningError naming the directory to chmod). Pass ``check_access=False`` when this
    federation will never be served by a root-started Mosquitto (e.g. the embedded-broker demo).

    ``clients`` get centrally generated keys (see the module docstring); pass none and enroll
    devices with :mod:`bridge.enroll` so that device keys stay on the devices. Time and disk are
    O(parties): no file holds more than one party's keys except the registry.
    """
    validate_party_id(federation)
    clients = list(clients)
    parties = [aggregator_id, *clients]
    for pid in parties:
        validate_party_id(pid)
    if len(set(parties)) != len(parties):
        seen: set[str] = set()
        dups = sorted({p for p in parties if p in seen or seen.add(p)})
        raise ProvisioningError(
            f"party ids must be unique (the aggregator is {aggregator_id!r}); repeated: "
            f"{', '.join(dups[:5])}"
        )
    for p in (port, password_port):
        if p is not None and not 0 < int(p) < 65536:
            raise ProvisioningError(f"port {p} is out of range 1-65535")
    if password_port is not None and int(password_port) == int(port):
        raise ProvisioningError("password_port must differ from the mTLS port")
    if max_packet_bytes < 1024:
        raise ProvisioningError(f"max_packet_bytes={max_packet_bytes} is too small (minimum 1024)")

    root = Path(out_dir).resolve()
    broker_user = _broker_user()
    if broker_user and check_access:  # before anything is written or deleted
        _check_traversable(root.parent, broker_user)
    _prepare_out_dir(root, force)

    paths = FederationPaths(
        root, federation, host, int(port), None if password_port is None else int(password_port)
    )
    for d in (paths.ca_dir, paths.broker_dir, paths.parties_dir):
        d.mkdir(mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)  # mkdir's mode is filtered by the umask
    paths.data_dir.mkdir(mode=0o700, exist_ok=True)

    ca_key, ca_cert = make_ca(federation, cert_days)
    _write_key(paths.ca_key, ca_key)
    _write_cert(paths.ca_cert, ca_cert)
    _write_bytes(paths.crl, make_crl(ca_key, ca_cert, []), _FILE_MODE)
    sans = _dedupe([host, "localhost", "127.0.0.1", "::1", *extra_hosts])
    srv_key, srv_cert = issue(
        ca_key, ca_cert, host, federation, sans=sans, server=True, days=cert_days
    )
    _write_key(paths.server_key, srv_key)
    _write_cert(paths.server_cert, srv_cert)
    registry = Registry.create(paths.registry, federation)

    agg = Identity.generate(aggregator_id, "aggregator")
    agg_key, agg_cert = issue(
        ca_key,
        ca_cert,
        aggregator_id,
        federation,
        sans=(),
        server=False,
        days=cert_days,
        identity=agg.public,
    )
    fed_doc = _federation_doc(paths, max_packet_bytes, agg.public, agg_cert)
    ca_pem = paths.ca_cert.read_bytes()
    registered: list[tuple[PublicIdentity, x509.Certificate]] = [(agg.public, agg_cert)]
    passwd_lines = []

    def add(ident: Identity, key, cert: x509.Certificate) -> None:
        password = secrets.token_urlsafe(24)
        doc = _party_federation_doc(paths, fed_doc, ident.role)
        _write_party(paths, ident, key, cert, ca_pem, doc, password)
        passwd_lines.append(f"{ident.party_id}:{mosquitto_password_hash(password)}")

    add(agg, agg_key, agg_cert)
    instances = _write_instances(paths, agg, ca_key, ca_cert, aggregator_instances, cert_days)
    for client_id in clients:
        ident = Identity.generate(client_id, "client")
        key, cert = issue(
            ca_key,
            ca_cert,
            client_id,
            federation,
            sans=(),
            server=False,
            days=cert_days,
            identity=ident.public,
        )
        add(ident, key, cert)
        registered.append((ident.public, cert))
    with registry:
        registry.add(registered)

    if bind_host is None:
        bind_host = host if host == "localhost" or _is_ip(host) else ""
    conf = mosquitto_conf(paths, max_packet_bytes, bind_host)
    _write_text(paths.mosquitto_conf, conf, _FILE_MODE)
    _write_text(paths.acl, acl_text(federation, aggregator_id, instances=instances), _FILE_MODE)
    _write_text(paths.passwd, "\n".join(passwd_lines) + "\n", _SECRET_MODE)
    write_json(paths.federation_json, fed_doc)  # last: it declares the federation provisioned
    _give_broker_files(paths, broker_user, check_access)
    return paths


def add_client(
    fed_dir: str | os.PathLike, client_id: str, *, check_access: bool = True
) -> FederationPaths:
    """Provision one more client with centrally generated keys (labs and tests; devices enroll
    with :mod:`bridge.enroll` instead): identity, certificate, party directory, registry row and
    a password-file line. O(1) apart from the password file: the ACL grants by pattern and no
    other party's files change.

    A running Mosquitto accepts the new client's certificate at once (same CA) but reads the
    password file again only on SIGHUP (:meth:`bridge.broker.MosquittoBroker.reload`). A running
    aggregator sees the client within a second (:class:`bridge.registry.RegistryDirectory`).
    """
    paths = FederationPaths.open(fed_dir)
    validate_party_id(client_id)
    fed_doc = read_json(paths.federation_json)
    with _open_registry(paths) as registry:
        if registry.get(client_id) is not None:
            raise ProvisioningError(
                f"party {client_id!r} already exists in federation "
                f"{paths.federation!r}; pick another id"
            )
        ca_key, ca_cert = load_ca(paths.ca_key, paths.ca_cert)
        ident = Identity.generate(client_id, "client")
        key, cert = issue(
            ca_key,
            ca_cert,
            client_id,
            paths.federation,
            sans=(),
            server=False,
            days=_days_left(ca_cert),
            identity=ident.public,
        )
        password = secrets.token_urlsafe(24)
        # A leftover directory of an earlier, interrupted add_client is not registered: reuse.
        shutil.rmtree(paths.party_dir(client_id), ignore_errors=True)
        doc = _party_federation_doc(paths, fed_doc, "client")
        _write_party(paths, ident, key, cert, paths.ca_cert.read_bytes(), doc, password)
        set_password(paths, client_id, password)
        registry.add([(ident.public, cert)])  # last: it declares the party
    _give_broker_files(paths, _broker_user(), check_access)
    return paths


def set_password(paths: FederationPaths, party_id: str, password: str | None) -> None:
    """Set (or with None remove) a party's line of the broker's password file."""
    lines = [ln for ln in _read_lines(paths.passwd) if not ln.startswith(f"{party_id}:")]
    if password is not None:
        lines.append(f"{party_id}:{mosquitto_password_hash(password)}")
    _write_text(paths.passwd, "".join(ln + "\n" for ln in lines), _SECRET_MODE)


def _open_registry(paths: FederationPaths) -> Registry:
    if not paths.registry.is_file():
        raise ProvisioningError(
            f"{paths.registry} is missing: this federation was provisioned by an older cotune "
            "(one directory copy per party); re-provision it"
        )
    return Registry(paths.registry)


def _federation_doc(
    paths: FederationPaths, max_packet_bytes: int, aggregator: PublicIdentity, agg_cert
) -> dict:
    """DIR/federation.json: the public facts every party shares, the aggregator's public
    identity and certificate, and where the registry is."""
    return {
        "federation": paths.federation,
        "broker": {
            "host": paths.host,
            "port": paths.port,
            "tls": True,
            "password_port": paths.password_port,
        },
        "max_packet_bytes": int(max_packet_bytes),
        "directory": Directory(paths.federation, [aggregator]).to_json(),
        "aggregator_cert": agg_cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "registry": paths.registry.name,
    }


def _party_federation_doc(paths: FederationPaths, fed_doc: dict, role: str) -> dict:
    """A party's copy of federation.json: a client's names the aggregator only; the
    aggregator's names the registry (relative to the party directory)."""
    doc = {k: v for k, v in fed_doc.items() if k != "registry"}
    if role == "aggregator":
        doc["registry"] = os.path.relpath(paths.registry, paths.parties_dir / "x")
    return doc


def party_config_doc(
    federation: str, party_id: str, role: str, fed_doc: dict, password: str | None
) -> dict:
    """A party's config.json (paths relative to the party directory)."""
    broker = fed_doc["broker"]
    return {
        "federation": federation,
        "party_id": party_id,
        "role": role,
        "broker": {
            "host": broker["host"],
            "port": broker["port"],
            "password_port": broker.get("password_port"),
            "tls": {"ca": "ca.crt", "cert": "client.crt", "key": "client.key"},
        },
        "identity": "identity.json",
        "federation_file": "federation.json",
        "max_packet_bytes": fed_doc["max_packet_bytes"],
        # for the password listener, where a device cannot present a client certificate
        "password": password,
    }


def instance_name(aggregator_id: str, index: int) -> str:
    """The broker identity of aggregator ingest worker ``index``. '~' is outside the party-id
    alphabet, so no device can ever enroll under it."""
    return f"{aggregator_id}~ingest-{index}"


def instance_names(paths: FederationPaths, aggregator_id: str) -> list[str]:
    """The broker identities of the aggregator's ingest workers provisioned so far."""
    d = paths.party_dir(aggregator_id) / "instances"
    if not d.is_dir():
        return []
    ks = sorted(int(p.stem.split("-", 1)[1]) for p in d.glob("ingest-*.crt") if p.stem.split("-", 1)[1].isdigit())
    return [instance_name(aggregator_id, k) for k in ks]


def _write_instances(paths: FederationPaths, agg: Identity, ca_key, ca_cert, count: int,
                     days: int) -> list[str]:
    if count < 0:
        raise ProvisioningError(f"aggregator_instances must be >= 0, got {count}")
    out = paths.party_dir(agg.party_id) / "instances"
    names = []
    for k in range(count):
        name = instance_name(agg.party_id, k)
        key, cert = issue(ca_key, ca_cert, name, paths.federation, sans=(), server=False, days=days,
                          identity=agg.public)
        out.mkdir(mode=0o700, exist_ok=True)
        _create(out / f"ingest-{k}.key", _key_pem(key), _SECRET_MODE)
        _create(out / f"ingest-{k}.crt", cert.public_bytes(serialization.Encoding.PEM), _FILE_MODE)
        names.append(name)
    return names


def _write_party(
    paths: FederationPaths,
    ident: Identity,
    key,
    cert: x509.Certificate,
    ca_pem: bytes,
    fed_doc: dict,
    password: str | None,
) -> None:
    """Write one party's directory. Built beside its final place and renamed, so a party
    directory is either complete or absent (hence plain writes inside it)."""
    final = paths.party_dir(ident.party_id)
    tmp = final.with_name(f".{ident.party_id}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)
    ident.save(tmp / "identity.json")
    _create(tmp / "client.key", _key_pem(key), _SECRET_MODE)
    _create(tmp / "client.crt", cert.public_bytes(serialization.Encoding.PEM), _FILE_MODE)
    _create(tmp / "ca.crt", ca_pem, _FILE_MODE)
    write_json(tmp / "federation.json", fed_doc)
    config = party_config_doc(paths.federation, ident.party_id, ident.role, fed_doc, password)
    write_json(tmp / "config.json", config, mode=_SECRET_MODE)
    os.replace(tmp, final)


def _prepare_out_dir(root: Path, force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ProvisioningError(f"{root} exists and is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not force:
            raise ProvisioningError(
                f"{root} already exists and is not empty: choose a new directory, add parties to "
                "it with add_client, or pass force=True (--force) to replace it, which discards "
                "its CA, broker files and every party identity"
            )
        ours = {
            "federation.json",
            "federation.json.tmp",
            "registry.db",
            "registry.db-journal",
            "ca",
            "broker",
            "parties",
        }
        foreign = sorted(p.name for p in root.iterdir() if p.name not in ours)
        # A half-written federation (no federation.json yet) may be replaced; anything else that
        # holds files we did not write is not ours to delete.
        if foreign and not (root / "federation.json").is_file():
            raise ProvisioningError(
                f"{root} holds files that are not a federation's ({', '.join(foreign[:3])}): "
                "refusing to delete it even with force=True; choose another directory"
            )
        for name in ours:
            p = root / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # the broker user must traverse it (mkdtemp makes 0700)


# ---------------------------------------------------------------------------------------------
# Broker files


def mosquitto_conf(paths: FederationPaths, max_packet_bytes: int, bind_host: str = "") -> str:
    """Mosquitto 2.0 configuration for the federation. Paths are absolute because Mosquitto
    resolves relative ones against its working directory, not against the config file."""
    common_tls = [
        f"cafile {paths.ca_cert}",
        f"certfile {paths.server_cert}",
        f"keyfile {paths.server_key}",
        f"crlfile {paths.crl}",
        "tls_version tlsv1.2",
    ]
    lines = [
        f"# cotune federation {paths.federation!r}: generated by bridge.provision, do not edit",
        "# (re-provision, or use add_client / enroll / revoke).",
        "",
        "# One set of auth settings (acl_file, password_file, allow_anonymous) for all listeners.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {paths.acl}",
        f"password_file {paths.passwd}",
        "",
        "# Sessions and queued QoS 1 messages survive a broker restart.",
        "persistence true",
        f"persistence_location {paths.data_dir}/",
        "autosave_interval 30",
        "persistent_client_expiration 14d",
        "",
        "# Limits: one packet holds one chunk plus topic and header.",
        f"max_packet_size {int(max_packet_bytes) + PACKET_HEADROOM}",
        "max_queued_messages 10000",
        "max_inflight_messages 100",
        "",
        "log_dest stdout",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "connection_messages true",
        "",
        "# mTLS listener: the client certificate's CN (the party id) is the MQTT username.",
        f"listener {paths.port} {bind_host}".rstrip(),
        *common_tls,
        "require_certificate true",
        "use_identity_as_username true",
        "# the client id is the certificate identity, whatever the client asks for: a member",
        "# can neither disconnect another party nor take over its persistent session",
        "use_username_as_clientid true",
    ]
    if paths.password_port is not None:
        lines += [
            "",
            "# Password listener for parties that cannot present a certificate: server-side TLS",
            "# only, username = party id, password from the party's config.json.",
            f"listener {paths.password_port} {bind_host}".rstrip(),
            *common_tls,
            "require_certificate false",
            "use_username_as_clientid true",
        ]
    return "\n".join(lines) + "\n"


def acl_text(federation: str, aggregator_id: str, revoked: Iterable[str] = (), *,
             instances: Iterable[str] = ()) -> str:
    """Mosquitto ACL for DESIGN.md's topic layout (usernames are party ids). Its size does not
    grow with the fleet: parties are granted by pattern; only revoked parties are listed.

    What Mosquitto 2.0 does with it (checked against 2.0.11 in tests/test_broker.py and
    tests/test_enroll.py): SUBSCRIBE is not ACL-checked by the default ACL (a client may
    subscribe to anything, even ``cotune/F/#``); every message is checked against the
    subscriber's *read* access to its topic at delivery time, so nothing leaks. Shared
    subscriptions ``$share/<group>/cotune/F/up/+`` therefore need no ACL line of their own: the
    aggregator's ``cotune/F/#`` covers the topics delivered. A denied PUBLISH is dropped silently
    (an MQTT 5 publisher gets PUBACK 0x87). A user's ``topic deny`` is checked before any
    pattern, so a revoked party that is still connected loses every topic once the broker
    re-reads the ACL (SIGHUP). ``pattern read`` of the broadcast topic applies to every user
    the broker lets in: holders of a certificate of the federation CA (parties) and password-file
    users (parties).
    """
    t = Topics(federation)
    lines = [
        f"# cotune federation {federation!r}: generated by bridge.provision, do not edit.",
        "# Usernames are party ids (certificate CN, or password-file user).",
        "",
        f"user {aggregator_id}",
        f"topic readwrite {t.root}/#",
    ]
    for name in instances:  # the aggregator's ingest workers (their own broker identities)
        lines += [f"user {name}", f"topic readwrite {t.root}/#"]
    lines += [
        "",
        "# revoked parties: a user's deny is checked before any pattern",
    ]
    for party in sorted(set(revoked)):
        lines += [f"user {party}", f"topic deny {t.root}/#"]
    lines += [
        "",
        "# every party: read the broadcast topic and its own down topic, write its own up and",
        "# status topics",
        f"pattern read {t.bcast}",
        f"pattern read {t.down('%u')}",
        f"pattern write {t.up('%u')}",
        f"pattern write {t.status('%u')}",
        "",
    ]
    return "\n".join(lines)


def mosquitto_password_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """A ``mosquitto_passwd`` compatible ``$7$`` hash: PBKDF2-HMAC-SHA512, 12-byte salt."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_password(hashed: str, password: str) -> bool:
    try:
        _, kind, iterations, salt, _digest = hashed.split("$")
        if kind != "7":
            return False
        expected = mosquitto_password_hash(
            password, salt=base64.b64decode(salt), iterations=int(iterations)
        )
    except ValueError:
        return False
    return secrets.compare_digest(expected, hashed)


def check_broker_access(paths: FederationPaths) -> None:
    """When the broker will run as root (and so drop to the ``mosquitto`` user), check that this
    user can reach and read every file it needs. ProvisioningError says what to chmod."""
    user = _broker_user()
    if user is None:
        return
    _check_traversable(paths.root, user)
    uid, gids = user
    for p in paths.broker_files():
        if not p.exists():
            raise ProvisioningError(f"{p} is missing; re-provision the federation")
        _check_traversable(p.parent, user)
        want = (stat.S_IRUSR | stat.S_IWUSR | stat.S_IXUSR) if p.is_dir() else stat.S_IRUSR
        if not _allowed(p, uid, gids, want):
            raise ProvisioningError(
                f"{p} is not accessible to the broker user {BROKER_USER!r}: "
                f"run `chown {BROKER_USER} {p}`"
            )


def _broker_user() -> tuple[int, set[int]] | None:
    """(uid, gids) of the user a root-started Mosquitto drops to; None when no drop happens."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(BROKER_USER)
    except KeyError:
        return None
    gids = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if BROKER_USER in g.gr_mem}
    return pw.pw_uid, gids


def _allowed(path: Path, uid: int, gids: set[int], user_bits: int) -> bool:
    """Whether ``uid`` has the permission bits ``user_bits`` (given as S_I*USR) on path."""
    st = path.stat()
    if st.st_uid == uid:
        return st.st_mode & user_bits == user_bits
    if st.st_gid in gids:
        return st.st_mode & (user_bits >> 3) == user_bits >> 3
    return st.st_mode & (user_bits >> 6) == user_bits >> 6


def _check_traversable(directory: Path, user: tuple[int, set[int]]) -> None:
    uid, gids = user
    d = directory
    while not d.exists():  # not created yet: check what exists above it
        d = d.parent
    for p in [d, *d.parents]:
        if not _allowed(p, uid, gids, stat.S_IXUSR):
            mode = stat.S_IMODE(p.stat().st_mode)
            raise ProvisioningError(
                f"directory {p} (mode {mode:04o}) is not traversable by the broker user "
                f"{BROKER_USER!r}, which Mosquitto switches to when started as root: run "
                f"`chmod o+x {p}` or provision the federation under another directory"
            )


def _give_broker_files(
    paths: FederationPaths, user: tuple[int, set[int]] | None, check: bool
) -> None:
    """Hand the broker's own files to the broker user (when one will be switched to)."""
    if user is None:
        return
    uid, _ = user
    gid = pwd.getpwuid(uid).pw_gid
    for p in (
        paths.mosquitto_conf,
        paths.acl,
        paths.passwd,
        paths.server_cert,
        paths.server_key,
        paths.data_dir,
    ):
        os.chown(p, uid, gid)
    for p in paths.data_dir.rglob("*"):
        os.chown(p, uid, gid)
    if check:
        check_broker_access(paths)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        return False


def _days_left(cert: x509.Certificate) -> int:
    return max(1, (cert.not_valid_after_utc - _utcnow()).days)


def _utcnow():
    from .ca import now_utc

    return now_utc()


def _write_bytes(path: Path, data: bytes, mode: int) -> None:
    """Atomic write with the final mode set before the file becomes visible."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _create(path: Path, data: bytes, mode: int) -> None:
    """Plain write of a new file (inside a directory that is renamed into place when done)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, mode)


def _write_text(path: Path, text: str, mode: int) -> None:
    _write_bytes(path, text.encode("utf-8"), mode)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_key(path: Path, key) -> None:
    _write_bytes(path, _key_pem(key), _SECRET_MODE)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _write_bytes(path, cert.public_bytes(serialization.Encoding.PEM), _FILE_MODE)


def _read_lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        return []


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(i for i in items if i))
