"""Device enrollment and revocation: a device makes its own keys and joins the federation with a
CSR and a one-time token; no private key ever leaves it.

1. Operator (CA side): :func:`issue_token` binds a one-time token to a party id, with an expiry.
   Only a hash of its secret is stored (``DIR/ca/enroll.db``, 0600). The token string
   ``cte1:<federation>:<token id>:<secret>`` goes to the device out of band.
2. Device: :func:`create_request` generates the Ed25519 + X25519 envelope identity and the TLS
   key (EC P-256) in the device directory, and a request holding only public material: a CSR
   (CN = party id, signed by the TLS key, carrying the envelope public keys in the cotune
   extension, so the TLS key vouches for them), the envelope public keys, a proof of possession
   (Ed25519 signature over the request) and a token proof (HMAC-SHA256 keyed by the token's
   hash: the request does not reveal the token).
3. CA: :func:`sign_request` checks token (known, for this party id, unused, unexpired, proof),
   proof of possession and CSR (signature, CN, bound keys), then issues the client certificate
   with the envelope keys bound in (:mod:`bridge.ca`), registers the party
   (:mod:`bridge.registry`) and consumes the token, and returns a bundle: certificate, CA, the
   aggregator's public identity and certificate, broker address, packet limit, authenticated
   with the token key (HMAC) so the device can trust the CA certificate it receives. Any failure
   raises a typed :class:`EnrollmentError` and registers nothing; the token stays usable.
4. Device: :func:`install_bundle` verifies the bundle and writes the party directory that
   :func:`bridge.provision.load_party_config` and the edge client read.

Transport: files (``cotune enroll request`` / ``sign`` / ``install``) or HTTPS
(:class:`EnrollServer`, ``cotune enroll serve``; stdlib ``http.server`` with the broker's server
certificate). The device cannot verify that server before it has the CA certificate, so by
default :func:`submit` does not verify it (``ca_file`` pins it when the device has ``ca.crt``):
the request is public material, and the bundle's HMAC under the token key, which a
man in the middle does not know, is what authenticates the CA certificate the device installs.

Revocation (:func:`revoke`): the registry marks the party revoked (a running aggregator's
directory then raises :class:`~bridge.errors.Revoked` for it), the CA rewrites the CRL that the
broker's listeners load (``crlfile``), the ACL denies the party every topic and its password is
removed. Mosquitto 2.0.11 re-reads the CRL, ACL and password file on SIGHUP (checked in
tests/test_enroll.py), which :func:`bridge.broker.reload_running_broker` sends. SIGHUP does not
drop a connection that is already open: the ACL then denies it every topic, and the envelope
refuses what it signs.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import ssl
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .ca import (
    certified_identity,
    common_name,
    envelope_keys,
    envelope_keys_extension,
    issue_certificate,
    load_ca,
    make_crl,
)
from .errors import ProvisioningError
from .keys import Identity, PublicIdentity, b64d, b64e, read_json, validate_party_id, write_json
from .provision import (
    FederationPaths,
    PartyConfig,
    _broker_user,
    _days_left,
    _give_broker_files,
    _key_pem,
    _write_bytes,
    _write_text,
    acl_text,
    instance_names,
    load_party_config,
    party_config_doc,
    set_password,
)
from .registry import REVOKED, AlreadyEnrolled, Record, Registry

log = logging.getLogger(__name__)

TOKEN_PREFIX = "cte1"
DEFAULT_TOKEN_TTL_S = 7 * 24 * 3600
MAX_REQUEST_BYTES = 64 * 1024
_REQ_DOMAIN = b"cotune/enroll/request/v1|"
_BUNDLE_DOMAIN = b"cotune/enroll/bundle/v1|"
PENDING_FILE = "enroll-pending.json"  # device side, 0600: token key id + HMAC key, until install
REQUEST_FILE = "enroll-request.json"  # device side: public, what goes to the CA


class EnrollmentError(ProvisioningError):
    """An enrollment request or bundle that is refused; nothing was registered."""

    code = "enrollment"


class TokenUnknown(EnrollmentError):
    code = "token_unknown"


class TokenReused(EnrollmentError):
    code = "token_reused"


class TokenExpired(EnrollmentError):
    code = "token_expired"


class TokenWrongParty(EnrollmentError):
    code = "token_wrong_party"


class BadProof(EnrollmentError):
    """The token proof (HMAC) or the proof of possession (Ed25519 signature) does not verify."""

    code = "bad_proof"


class BadCSR(EnrollmentError):
    """The CSR's signature, subject, key type or bound envelope keys are wrong."""

    code = "bad_csr"


_ERRORS = {
    c.code: c
    for c in (
        EnrollmentError,
        TokenUnknown,
        TokenReused,
        TokenExpired,
        TokenWrongParty,
        BadProof,
        BadCSR,
        AlreadyEnrolled,
    )
}


# ---------------------------------------------------------------------------------------------
# Tokens (CA side)


def _mac_key(secret: str) -> bytes:
    return hashlib.sha256(b"cotune/enroll/token|" + secret.encode("ascii")).digest()


def _mac(key: bytes, domain: bytes, doc: dict) -> str:
    return b64e(hmac.new(key, domain + _canonical(doc), hashlib.sha256).digest())


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def parse_token(token: str) -> tuple[str, str, bytes]:
    """(federation, token id, HMAC key) of a token string."""
    parts = token.strip().split(":")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX or not all(parts[1:]):
        raise EnrollmentError(
            f"not an enrollment token (expected {TOKEN_PREFIX}:<federation>:<id>:<secret>)"
        )
    return parts[1], parts[2], _mac_key(parts[3])


class _TokenStore:
    """``DIR/ca/enroll.db``: token id -> party id, HMAC key (a hash of the secret), expiry,
    use. Writes run under ``BEGIN IMMEDIATE`` so a token is consumed once across processes."""

    def __init__(self, path: Path):
        new = not path.exists()
        if new:  # created 0600 before SQLite opens it
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.db = sqlite3.connect(path, timeout=10, isolation_level=None)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS tokens (token_id TEXT PRIMARY KEY, party_id TEXT NOT NULL,"
            " mac_key BLOB NOT NULL, created REAL NOT NULL, expires REAL NOT NULL, used_at REAL)"
        )

    def close(self) -> None:
        self.db.close()


def issue_token(
    fed_dir: str | os.PathLike, party_id: str, *, ttl_s: float = DEFAULT_TOKEN_TTL_S
) -> str:
    """A one-time enrollment token for ``party_id``, valid ``ttl_s`` seconds. Issuing another
    token for the same party invalidates the earlier unused ones."""
    paths = FederationPaths.open(fed_dir)
    validate_party_id(party_id)
    if ttl_s <= 0:
        raise EnrollmentError(f"token lifetime must be positive, got {ttl_s}")
    with Registry(paths.registry) as reg:
        if reg.get(party_id) is not None:
            raise AlreadyEnrolled(
                f"party {party_id!r} is already registered in federation {paths.federation!r} "
                "(ids are never reused, even after revocation)"
            )
    token_id, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    now = time.time()
    store = _TokenStore(paths.enroll_db)
    try:
        store.db.execute("BEGIN IMMEDIATE")
        store.db.execute("DELETE FROM tokens WHERE party_id=? AND used_at IS NULL", (party_id,))
        store.db.execute(
            "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)",
            (token_id, party_id, _mac_key(secret), now, now + ttl_s),
        )
        store.db.execute("COMMIT")
    finally:
        store.close()
    return f"{TOKEN_PREFIX}:{paths.federation}:{token_id}:{secret}"


# ---------------------------------------------------------------------------------------------
# Device side


def create_request(device_dir: str | os.PathLike, party_id: str, token: str) -> dict:
    """Generate this device's keys in ``device_dir`` (0700; private files 0600) and return the
    enrollment request (also written to ``enroll-request.json``). Run again after a failed
    submission, it reuses the keys it made."""
    federation, token_id, mac_key = parse_token(token)
    validate_party_id(party_id)
    d = Path(device_dir)
    if (d / "config.json").exists():
        raise EnrollmentError(f"{d} already holds an installed party; enroll into a new directory")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ident_path, key_path = d / "identity.json", d / "client.key"
    pending = {
        "federation": federation,
        "party_id": party_id,
        "token_id": token_id,
        "mac_key": b64e(mac_key),
    }
    if ident_path.exists() and key_path.exists():
        ident = Identity.load(ident_path)
        if ident.party_id != party_id:
            raise EnrollmentError(f"{d} holds keys of {ident.party_id!r}, not {party_id!r}")
        tls_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        ident = Identity.generate(party_id, "client")
        tls_key = ec.generate_private_key(ec.SECP256R1())
        ident.save(ident_path)
        _write_bytes(key_path, _key_pem(tls_key), 0o600)
    write_json(d / PENDING_FILE, pending, mode=0o600)

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cotune"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, party_id),
        ]
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(envelope_keys_extension(ident.public), critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    body = {
        "v": 1,
        "federation": federation,
        "party_id": party_id,
        "token_id": token_id,
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "sign_pub": b64e(ident.public.sign_pub),
        "kx_pub": b64e(ident.public.kx_pub),
        "created": time.time(),
    }
    request = {
        **body,
        "pop": b64e(ident.sign_key.sign(_REQ_DOMAIN + _canonical(body))),
        "token_mac": _mac(mac_key, _REQ_DOMAIN, body),
    }
    write_json(d / REQUEST_FILE, request)
    return request


def install_bundle(device_dir: str | os.PathLike, bundle: dict) -> PartyConfig:
    """Check the CA's bundle against the token and this device's keys, write the party
    directory (client.crt, ca.crt, federation.json, config.json) and load it."""
    d = Path(device_dir)
    pending = read_json(d / PENDING_FILE)
    ident = Identity.load(d / "identity.json")
    body = {k: v for k, v in bundle.items() if k != "mac"}
    mac = bundle.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(
        mac, _mac(b64d(pending["mac_key"]), _BUNDLE_DOMAIN, body)
    ):
        raise BadProof("the bundle is not authenticated by this device's enrollment token")
    if (bundle.get("federation"), bundle.get("party_id")) != (
        pending["federation"],
        pending["party_id"],
    ):
        raise EnrollmentError("the bundle is for another federation or party")
    try:
        ca = x509.load_pem_x509_certificate(bundle["ca"].encode())
        cert = x509.load_pem_x509_certificate(bundle["cert"].encode())
        agg_cert = x509.load_pem_x509_certificate(bundle["aggregator_cert"].encode())
        agg = bundle["aggregator"]
        agg_pub = PublicIdentity.from_json(agg["party_id"], agg)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise EnrollmentError(f"malformed bundle ({exc})") from exc
    if certified_identity(cert, ca, ident.party_id) != ident.public:
        raise EnrollmentError("the certificate certifies other envelope keys than this device's")
    tls_key = serialization.load_pem_private_key((d / "client.key").read_bytes(), password=None)
    if cert.public_key() != tls_key.public_key():
        raise EnrollmentError("the certificate is for another TLS key than this device's")
    if certified_identity(agg_cert, ca, agg_pub.party_id) != agg_pub:
        raise EnrollmentError("the aggregator's keys are not the ones its certificate certifies")

    fed_doc = {
        "federation": bundle["federation"],
        "broker": bundle["broker"],
        "max_packet_bytes": int(bundle["max_packet_bytes"]),
        "directory": {
            "federation": bundle["federation"],
            "parties": {agg_pub.party_id: agg_pub.to_json()},
        },
        "aggregator_cert": bundle["aggregator_cert"],
    }
    _write_bytes(d / "client.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_bytes(d / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)
    write_json(d / "federation.json", fed_doc)
    config = party_config_doc(fed_doc["federation"], ident.party_id, "client", fed_doc, None)
    write_json(d / "config.json", config, mode=0o600)  # last: the party is installed
    for name in (PENDING_FILE, REQUEST_FILE):
        (d / name).unlink(missing_ok=True)
    return load_party_config(d)


# ---------------------------------------------------------------------------------------------
# CA side


def sign_request(fed_dir: str | os.PathLike, request: dict) -> dict:
    """Verify an enrollment request, issue the certificate, register the party, consume the
    token; return the bundle for the device. Typed EnrollmentError otherwise, with nothing
    registered and the token left as it was."""
    paths = FederationPaths.open(fed_dir)
    body, party_id, token_id, csr, claimed = _parse_request(request)
    if body["federation"] != paths.federation:
        raise EnrollmentError(
            f"request is for federation {body['federation']!r}, this is {paths.federation!r}"
        )
    store = _TokenStore(paths.enroll_db)
    try:
        store.db.execute("BEGIN IMMEDIATE")
        row = store.db.execute(
            "SELECT party_id, mac_key, expires, used_at FROM tokens WHERE token_id=?", (token_id,)
        ).fetchone()
        if row is None:
            raise TokenUnknown(f"token {token_id} is unknown (never issued, or replaced)")
        bound_party, mac_key, expires, used_at = row
        mac = request.get("token_mac")
        if not isinstance(mac, str) or not hmac.compare_digest(
            mac, _mac(mac_key, _REQ_DOMAIN, body)
        ):
            raise BadProof(f"token proof of {token_id} does not verify (wrong token secret)")
        if bound_party != party_id:
            raise TokenWrongParty(
                f"token {token_id} was issued for {bound_party!r}, the request is for {party_id!r}"
            )
        if used_at is not None:
            raise TokenReused(f"token {token_id} was already used; ask for a new token")
        if time.time() > expires:
            raise TokenExpired(f"token {token_id} expired; ask for a new token")
        try:
            claimed.verify_key.verify(b64d(request["pop"]), _REQ_DOMAIN + _canonical(body))
        except (KeyError, TypeError, ValueError, InvalidSignature):
            raise BadProof("proof of possession of the signing key does not verify") from None
        _check_csr(csr, party_id, claimed)

        ca_key, ca_cert = load_ca(paths.ca_key, paths.ca_cert)
        cert = issue_certificate(
            ca_key,
            ca_cert,
            csr.public_key(),
            party_id,
            paths.federation,
            days=_days_left(ca_cert),
            identity=claimed,
        )
        with Registry(paths.registry) as reg:
            reg.add([(claimed, cert)])  # AlreadyEnrolled rolls the token back
        store.db.execute("UPDATE tokens SET used_at=? WHERE token_id=?", (time.time(), token_id))
        store.db.execute("COMMIT")
    except BaseException:
        if store.db.in_transaction:
            store.db.execute("ROLLBACK")
        raise
    finally:
        store.close()

    fed_doc = read_json(paths.federation_json)
    agg_id, agg_json = next(iter(fed_doc["directory"]["parties"].items()))
    bundle = {
        "v": 1,
        "federation": paths.federation,
        "party_id": party_id,
        "serial": f"{cert.serial_number:x}",
        "cert": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "ca": ca_cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "aggregator": {"party_id": agg_id, **agg_json},
        "aggregator_cert": fed_doc["aggregator_cert"],
        "broker": fed_doc["broker"],
        "max_packet_bytes": fed_doc["max_packet_bytes"],
    }
    bundle["mac"] = _mac(mac_key, _BUNDLE_DOMAIN, bundle)
    return bundle


def _parse_request(request: dict):
    if not isinstance(request, dict) or request.get("v") != 1:
        raise EnrollmentError("malformed request: not a version 1 enrollment request")
    body = {k: v for k, v in request.items() if k not in ("pop", "token_mac")}
    try:
        party_id, token_id = str(body["party_id"]), str(body["token_id"])
        validate_party_id(party_id)
        claimed = PublicIdentity(party_id, "client", b64d(body["sign_pub"]), b64d(body["kx_pub"]))
        if not isinstance(body["federation"], str):
            raise TypeError("federation must be a string")
        csr_pem = body["csr"].encode("ascii")
    except (KeyError, TypeError, ValueError, AttributeError, ProvisioningError) as exc:
        raise EnrollmentError(f"malformed request ({exc})") from exc
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise BadCSR(f"the CSR does not parse ({exc})") from exc
    return body, party_id, token_id, csr, claimed


def _check_csr(csr: x509.CertificateSigningRequest, party_id: str, claimed: PublicIdentity):
    if not csr.is_signature_valid:
        raise BadCSR("the CSR's signature does not verify (tampered CSR)")
    try:
        cn = common_name(csr)
        bound = envelope_keys(csr, party_id)
    except ProvisioningError as exc:
        raise BadCSR(f"bad CSR: {exc}") from exc
    if cn != party_id:
        raise BadCSR(f"the CSR is for {cn!r}, the request for {party_id!r}")
    if bound != claimed:
        raise BadCSR("the CSR binds other envelope keys than the request carries")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise BadCSR("the CSR's TLS key must be EC P-256")


# ---------------------------------------------------------------------------------------------
# Revocation


def revoke(fed_dir: str | os.PathLike, party_id: str) -> Record:
    """Revoke a party: registry, CRL, ACL, password file (each rewritten atomically). The
    broker applies the CRL, ACL and password file when it gets SIGHUP; a running aggregator's
    directory refuses the party within a second (or at once on ``directory.refresh()``)."""
    paths = FederationPaths.open(fed_dir)
    fed_doc = read_json(paths.federation_json)
    agg_id = next(iter(fed_doc["directory"]["parties"]))
    if party_id == agg_id:
        raise ProvisioningError("the aggregator cannot be revoked; re-provision the federation")
    ca_key, ca_cert = load_ca(paths.ca_key, paths.ca_cert)  # fail before changing anything
    with Registry(paths.registry) as reg:
        rec = reg.revoke(party_id)
        revoked = reg.records(REVOKED)
    _write_bytes(
        paths.crl, make_crl(ca_key, ca_cert, [(r.serial, r.revoked_at) for r in revoked]), 0o644
    )
    _write_text(paths.acl, acl_text(paths.federation, agg_id, [r.party_id for r in revoked],
                                    instances=instance_names(paths, agg_id)), 0o644)
    set_password(paths, party_id, None)
    _give_broker_files(paths, _broker_user(), check=False)
    return rec


# ---------------------------------------------------------------------------------------------
# HTTPS enrollment endpoint


class EnrollServer:
    """``POST /v1/enroll`` with a request (JSON) -> 200 and the bundle, or 4xx and
    ``{"error": code, "message": ...}``. TLS with the broker's server certificate, so a device
    that already has ``ca.crt`` can verify it. One thread per request; requests serialize on
    the token store's write lock."""

    def __init__(self, fed_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0):
        self.paths = FederationPaths.open(fed_dir)
        fed_root = self.paths.root

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                if self.path != "/v1/enroll":
                    return self._reply(404, {"error": "not_found", "message": self.path})
                n = int(self.headers.get("Content-Length") or 0)
                if not 0 < n <= MAX_REQUEST_BYTES:
                    return self._reply(413, {"error": "enrollment", "message": "bad body size"})
                try:
                    request = json.loads(self.rfile.read(n))
                    return self._reply(200, sign_request(fed_root, request))
                except json.JSONDecodeError:
                    return self._reply(400, {"error": "enrollment", "message": "not JSON"})
                except ProvisioningError as exc:
                    return self._reply(400, {"error": exc.code, "message": str(exc)})
                except Exception:  # a bug or a broken federation directory: say so, keep serving
                    log.exception("enrollment request failed")
                    return self._reply(500, {"error": "enrollment", "message": "internal error"})

            def _reply(self, status: int, doc: dict) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt, *args):  # quiet: the caller logs what it needs
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.paths.server_cert), str(self.paths.server_key))
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/v1/enroll"

    def start(self) -> EnrollServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, daemon=True, name="cotune-enroll"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> EnrollServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def submit(url: str, request: dict, *, ca_file: str | None = None, timeout: float = 30) -> dict:
    """POST a request to an enrollment endpoint; the bundle, or the CA's typed error."""
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else _unverified_context()
    req = urllib.request.Request(
        url, data=json.dumps(request).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            doc = json.loads(exc.read())
            raise _ERRORS.get(doc["error"], EnrollmentError)(doc["message"]) from None
        except (ValueError, KeyError, TypeError):
            raise EnrollmentError(f"enrollment endpoint {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EnrollmentError(f"enrollment endpoint {url} is not reachable: {exc}") from exc


def _unverified_context() -> ssl.SSLContext:
    # Before enrollment the device has no CA to check the server with; the bundle's HMAC under
    # the token key is what authenticates the CA certificate it gets (module docstring).
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def enroll_online(
    device_dir, party_id: str, token: str, url: str, *, ca_file: str | None = None
) -> PartyConfig:
    """Device side, all steps: keys, request, submit, install."""
    request = create_request(device_dir, party_id, token)
    return install_bundle(device_dir, submit(url, request, ca_file=ca_file))
