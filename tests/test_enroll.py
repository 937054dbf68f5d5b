"""Fleet lifecycle: device enrollment (CSR + one-time token, keys made on the device), the client
registry the aggregator reads, and revocation honoured by a real Mosquitto (CRL, ACL) and by
the envelope."""

from __future__ import annotations

import base64
import json
import queue
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion

from bridge import enroll
from bridge.broker import MosquittoBroker, find_mosquitto, reload_running_broker
from bridge.ca import certified_identity, envelope_keys_extension
from bridge.envelope import Sealer
from bridge.errors import ProvisioningError, Revoked, UnknownSender
from bridge.keys import Identity, b64e, read_json
from bridge.provision import load_party_config, provision
from bridge.registry import Registry
from cotune.cli import main as cli

T = 5.0


@pytest.fixture
def fed(make_federation):
    """A federation whose only centrally provisioned client is alice; devices enroll."""
    return make_federation("enrollfed", ["alice"])


def private_secrets(device: Path) -> list[bytes]:
    """Every private key of a device, raw and as stored: what must never reach the CA side."""
    ident = Identity.load(device / "identity.json")
    raw = [
        ident.sign_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        ),
        ident.kx_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        ),
    ]
    tls = serialization.load_pem_private_key((device / "client.key").read_bytes(), None)
    raw.append(tls.private_numbers().private_value.to_bytes(32, "big"))
    out = []
    for r in raw:
        out += [r, base64.b64encode(r), base64.urlsafe_b64encode(r).rstrip(b"="), r.hex().encode()]
    return out + [(device / "client.key").read_bytes().split(b"\n")[1]]


def assert_nothing_secret(blob: bytes, secrets_: list[bytes], where: str) -> None:
    for s in secrets_:
        assert s not in blob, f"a device private key reached {where}"


def reseal(request: dict, device: Path, token: str) -> dict:
    """Recompute both proofs after changing a request: what a malicious token holder can do."""
    body = {k: v for k, v in request.items() if k not in ("pop", "token_mac")}
    ident = Identity.load(device / "identity.json")
    _, _, mac_key = enroll.parse_token(token)
    msg = enroll._REQ_DOMAIN + enroll._canonical(body)
    return {
        **body,
        "pop": b64e(ident.sign_key.sign(msg)),
        "token_mac": enroll._mac(mac_key, enroll._REQ_DOMAIN, body),
    }


def registered(fed) -> list[str]:
    with Registry(fed.registry) as reg:
        return sorted(r.party_id for r in reg.records())


# ------------------------------------------------------------------------------------------------
# Enrollment


def test_device_enrolls_without_its_private_keys_leaving_it(fed, tmp_path):
    device = tmp_path / "cam1"
    token = enroll.issue_token(fed.root, "cam1")
    assert token.startswith("cte1:enrollfed:")
    # the token store keeps a hash of the secret, never the token
    assert token.split(":")[3].encode() not in fed.enroll_db.read_bytes()
    assert oct(fed.enroll_db.stat().st_mode & 0o777) == "0o600"

    request = enroll.create_request(device, "cam1", token)
    request_bytes = json.dumps(request).encode()
    secrets_ = private_secrets(device)
    assert_nothing_secret(request_bytes, secrets_, "the request")
    assert oct(device.stat().st_mode & 0o777) == "0o700"

    bundle = enroll.sign_request(fed.root, request)
    assert_nothing_secret(json.dumps(bundle).encode(), secrets_, "the bundle")
    for f in fed.root.rglob("*"):  # registry, token store, CA, broker, party directories
        if f.is_file():
            assert_nothing_secret(f.read_bytes(), secrets_, str(f))
    assert not fed.party_dir("cam1").exists()  # the CA side writes no party directory for it

    pc = enroll.install_bundle(device, bundle)
    assert sorted(p.name for p in device.iterdir()) == [
        "ca.crt",
        "client.crt",
        "client.key",
        "config.json",
        "federation.json",
        "identity.json",
    ]
    assert (pc.party_id, pc.role, pc.federation) == ("cam1", "client", "enrollfed")
    assert private_secrets(device) == secrets_  # the keys it made are the keys it uses
    # a device knows itself and the aggregator, nothing of anyone else's
    assert sorted(p.party_id for p in pc.directory) == ["aggregator", "cam1"]
    assert (device / "federation.json").read_bytes() == (
        fed.party_dir("alice") / "federation.json"
    ).read_bytes()

    # the certificate certifies the envelope keys; the registry records them with its serial
    ca = x509.load_pem_x509_certificate(fed.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate((device / "client.crt").read_bytes())
    assert certified_identity(cert, ca, "cam1") == pc.identity.public
    with Registry(fed.registry) as reg:
        rec = reg.get("cam1")
        relayed = reg.certificate("cam1")
    # what the aggregator relays is checkable by any device that holds only the CA
    assert certified_identity(relayed, ca, "cam1") == pc.identity.public
    assert rec.active and rec.serial == cert.serial_number == int(bundle["serial"], 16)
    assert rec.public == pc.identity.public and abs(rec.enrolled_at - time.time()) < 60
    agg = load_party_config(fed.party_config("aggregator"))
    assert agg.directory.clients() == ["alice", "cam1"]

    # end to end: the aggregator opens what the enrolled device seals, and the other way
    dev = Sealer(pc.identity, pc.directory, max_message_bytes=1 << 20)
    hub = Sealer(agg.identity, agg.directory, max_message_bytes=1 << 20)
    assert hub.open(dev.seal("aggregator", "note", b"hello")).plaintext == b"hello"
    assert dev.open(hub.seal("cam1", "note", b"welcome")).plaintext == b"welcome"


def test_refused_requests_are_typed_and_register_nothing(fed, tmp_path):
    device = tmp_path / "cam2"
    token = enroll.issue_token(fed.root, "cam2")
    good = enroll.create_request(device, "cam2", token)
    before = registered(fed)

    def refused(request, error, match):
        with pytest.raises(error, match=match) as info:
            enroll.sign_request(fed.root, request)
        assert isinstance(info.value, ProvisioningError)
        assert registered(fed) == before

    # wrong token secret (same id): the token proof fails
    fed_id, tid, _ = token.split(":")[1:]
    forged = f"cte1:{fed_id}:{tid}:{'A' * 43}"
    refused(reseal(good, device, forged), enroll.BadProof, "token proof")
    # a field changed after the device signed it (here: the X25519 key)
    refused({**good, "kx_pub": b64e(b"\x01" * 32)}, enroll.BadProof, "token proof")
    # proof of possession by another signing key
    other = Identity.generate("cam2", "client")
    pop = b64e(other.sign_key.sign(b"anything"))
    refused({**good, "pop": pop}, enroll.BadProof, "proof of possession")
    # tampered CSR: one byte of its signature flipped, proofs recomputed by the token holder
    der = bytearray(
        x509.load_pem_x509_csr(good["csr"].encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0x01
    pem = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der))
        + (b"-----END CERTIFICATE REQUEST-----\n")
    )
    refused(reseal({**good, "csr": pem.decode()}, device, token), enroll.BadCSR, "signature")
    # a valid CSR that binds other envelope keys than the request carries
    tls = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.load_pem_x509_csr(good["csr"].encode()).subject)
        .add_extension(envelope_keys_extension(other.public), critical=False)
        .sign(tls, hashes.SHA256())
    )
    csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    refused(reseal({**good, "csr": csr_pem}, device, token), enroll.BadCSR, "other envelope keys")
    # a token issued for cam2, used by a request for cam3
    wrong = enroll.create_request(tmp_path / "cam3", "cam3", token)
    refused(wrong, enroll.TokenWrongParty, "issued for 'cam2'")
    # unknown token id
    refused(reseal({**good, "token_id": "0" * 16}, device, token), enroll.TokenUnknown, "unknown")
    # another federation
    refused({**good, "federation": "other"}, enroll.EnrollmentError, "federation 'other'")

    # none of that consumed the token: the genuine request still enrolls, exactly once
    enroll.install_bundle(device, enroll.sign_request(fed.root, good))
    before = registered(fed)
    assert "cam2" in before
    refused(good, enroll.TokenReused, "already used")

    # an expired token
    short = enroll.issue_token(fed.root, "cam4", ttl_s=0.05)
    late = enroll.create_request(tmp_path / "cam4", "cam4", short)
    time.sleep(0.1)
    refused(late, enroll.TokenExpired, "expired")
    # a party id that is taken cannot get a token (ids are never reused)
    with pytest.raises(enroll.AlreadyEnrolled):
        enroll.issue_token(fed.root, "alice")


def test_install_refuses_a_bundle_not_from_the_ca(fed, tmp_path):
    device = tmp_path / "cam5"
    token = enroll.issue_token(fed.root, "cam5")
    bundle = enroll.sign_request(fed.root, enroll.create_request(device, "cam5", token))
    # a man in the middle substitutes another CA (and can't recompute the token HMAC)
    rogue = provision(tmp_path / "rogue", "enrollfed", [], check_access=False)
    forged = {**bundle, "ca": rogue.ca_cert.read_text()}
    with pytest.raises(enroll.BadProof, match="not authenticated"):
        enroll.install_bundle(device, forged)
    assert not (device / "config.json").exists()
    assert enroll.install_bundle(device, bundle).party_id == "cam5"


def test_online_enrollment_over_https(fed, tmp_path):
    with enroll.EnrollServer(fed.root) as server:
        token = enroll.issue_token(fed.root, "cam6")
        # the device has no CA yet: the bundle's HMAC authenticates what it installs
        pc = enroll.enroll_online(tmp_path / "cam6", "cam6", token, server.url)
        assert pc.party_id == "cam6" and "cam6" in registered(fed)
        # typed errors cross the wire; a device that has ca.crt pins the endpoint with it
        with pytest.raises(enroll.TokenWrongParty):
            enroll.enroll_online(
                tmp_path / "cam7", "cam7", token, server.url, ca_file=str(fed.ca_cert)
            )
        rogue = provision(tmp_path / "rogue", "x", [], check_access=False)
        with pytest.raises(enroll.EnrollmentError, match="not reachable"):  # wrong CA pinned
            enroll.enroll_online(
                tmp_path / "cam8",
                "cam8",
                enroll.issue_token(fed.root, "cam8"),
                server.url,
                ca_file=str(rogue.ca_cert),
            )
    assert "cam7" not in registered(fed) and "cam8" not in registered(fed)


def test_registry_directory_follows_enrollments_and_revocations(fed, tmp_path):
    agg = load_party_config(fed.party_config("aggregator"))
    directory = agg.directory
    directory.auto_refresh_s = None  # explicit refresh only
    v0 = directory.version
    assert directory.refresh() is False  # nothing changed: one indexed query
    token = enroll.issue_token(fed.root, "cam9")
    dev = enroll.install_bundle(
        tmp_path / "d",
        enroll.sign_request(fed.root, enroll.create_request(tmp_path / "d", "cam9", token)),
    )
    frame = Sealer(dev.identity, dev.directory, max_message_bytes=1 << 20).seal(
        "aggregator", "note", b"x"
    )
    hub = Sealer(agg.identity, directory, max_message_bytes=1 << 20)
    with pytest.raises(UnknownSender) as info:
        hub.open(frame)  # not seen yet
    assert not isinstance(info.value, Revoked)
    assert directory.refresh() is True and directory.version > v0
    assert hub.open(frame).plaintext == b"x"

    # automatic: lookups re-check the registry version at most every auto_refresh_s
    enroll.revoke(fed.root, "cam9")
    directory.auto_refresh_s = 0.0
    directory._next_check = 0.0
    with pytest.raises(Revoked) as info:
        directory.sender("cam9")
    assert info.value.code == "revoked" and isinstance(info.value, UnknownSender)
    assert directory.clients() == ["alice"]
    with pytest.raises(Revoked):
        hub.seal("cam9", "note", b"nothing for you")


# ------------------------------------------------------------------------------------------------
# Revocation against a real Mosquitto


def _client(fed, certdir: Path, got: queue.Queue | None = None) -> tuple[mqtt.Client, bool]:
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"t-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv311,
        reconnect_on_failure=False,
    )
    c.tls_set(
        ca_certs=str(fed.ca_cert),
        certfile=str(certdir / "client.crt"),
        keyfile=str(certdir / "client.key"),
    )
    result: queue.Queue = queue.Queue()
    c.on_connect = lambda _c, _u, _f, rc, _p: result.put(not rc.is_failure)
    c.on_disconnect = lambda *a: result.put(False)
    if got is not None:
        c.on_message = lambda _c, _u, m: got.put((m.topic, m.payload))
    try:
        c.connect("127.0.0.1", fed.port, keepalive=30)
    except OSError:
        return c, False
    c.loop_start()
    try:
        ok = result.get(timeout=T)
    except queue.Empty:
        ok = False
    return c, ok


@pytest.mark.mosquitto
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto is not installed; CI installs it")
def test_revoked_device_is_refused_by_broker_and_envelope(fed, tmp_path):
    device = tmp_path / "cam10"
    pc = enroll.install_bundle(
        device,
        enroll.sign_request(
            fed.root, enroll.create_request(device, "cam10", enroll.issue_token(fed.root, "cam10"))
        ),
    )
    t = fed.topics
    clients = []
    with MosquittoBroker(fed.mosquitto_conf) as broker:
        try:
            got: queue.Queue = queue.Queue()
            agg, ok = _client(fed, fed.party_dir("aggregator"), got)
            assert ok
            agg.subscribe(t.up_wildcard, qos=1)
            cam, ok = _client(fed, device)  # enrolled device: mTLS works, the ACL pattern covers it
            alice, ok2 = _client(fed, fed.party_dir("alice"))
            clients += [agg, cam, alice]
            assert ok and ok2, broker.log_tail()
            time.sleep(0.3)  # SUBACK
            cam.publish(t.up("cam10"), b"before", qos=1).wait_for_publish(T)
            assert got.get(timeout=T) == (t.up("cam10"), b"before")

            agg_pc = load_party_config(fed.party_config("aggregator"))
            hub = Sealer(agg_pc.identity, agg_pc.directory, max_message_bytes=1 << 20)
            dev = Sealer(pc.identity, pc.directory, max_message_bytes=1 << 20)
            assert hub.open(dev.seal("aggregator", "note", b"ok")).plaintext == b"ok"

            rec = enroll.revoke(fed.root, "cam10")
            assert rec.status == "revoked"
            crl = x509.load_pem_x509_crl(fed.crl.read_bytes())
            assert crl.get_revoked_certificate_by_serial_number(rec.serial) is not None
            assert "user cam10\ntopic deny cotune/enrollfed/#" in fed.acl.read_text()
            assert reload_running_broker(fed.mosquitto_conf) == broker.pid
            time.sleep(0.5)

            # a new mTLS connection with the revoked certificate is refused (CRL on SIGHUP) ...
            again, ok = _client(fed, device)
            clients.append(again)
            assert not ok  # the same certificate connected above
            # ... the still-open connection may publish nothing (ACL deny before patterns) ...
            cam.publish(t.up("cam10"), b"after revocation", qos=1).wait_for_publish(T)
            alice.publish(t.up("alice"), b"sentinel", qos=1).wait_for_publish(T)
            assert got.get(timeout=T) == (t.up("alice"), b"sentinel")
            assert got.empty()
            # ... other parties still connect
            other, ok = _client(fed, fed.party_dir("alice"))
            clients.append(other)
            assert ok
            # ... and the envelope refuses what it signs once the directory is refreshed
            frame = dev.seal("aggregator", "note", b"after")
            agg_pc.directory.refresh()
            with pytest.raises(Revoked, match="revoked"):
                hub.open(frame)
        finally:
            for c in clients:
                c.disconnect()
                c.loop_stop()
    assert not (fed.broker_dir / "mosquitto.pid").exists()
    assert reload_running_broker(fed.mosquitto_conf) is None


def test_revoke_refuses_the_aggregator_and_unknown_parties(fed):
    with pytest.raises(ProvisioningError, match="aggregator cannot be revoked"):
        enroll.revoke(fed.root, "aggregator")
    with pytest.raises(ProvisioningError, match="not registered"):
        enroll.revoke(fed.root, "nobody")
    enroll.revoke(fed.root, "alice")  # a centrally provisioned client: its password goes too
    assert "alice:" not in fed.passwd.read_text()
    assert enroll.revoke(fed.root, "alice").status == "revoked"  # idempotent


# ------------------------------------------------------------------------------------------------
# CLI and scale


def test_cli_enroll_and_revoke(fed, tmp_path, capsys):
    assert cli(["enroll", "token", str(fed.root), "cam11", "--ttl-hours", "1"]) == 0
    token = capsys.readouterr().out.strip()
    device = tmp_path / "cam11"
    assert (
        cli(["enroll", "request", "--party", "cam11", "--token", token, "--dir", str(device)]) == 0
    )
    req = device / enroll.REQUEST_FILE
    assert req.is_file() and "request written" in capsys.readouterr().out
    bundle = tmp_path / "bundle.json"
    assert cli(["enroll", "sign", str(fed.root), str(req), "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert cli(["enroll", "sign", str(fed.root), str(req), "--out", str(bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cotune: error: TokenReused:") and "\n" not in err
    assert cli(["enroll", "install", str(device), str(bundle)]) == 0
    assert "installed 'cam11'" in capsys.readouterr().out
    assert load_party_config(device).party_id == "cam11"
    assert cli(["revoke", str(fed.root), "cam11"]) == 0
    out = capsys.readouterr().out
    assert "revoked 'cam11'" in out and "SIGHUP" in out
    assert cli(["revoke", str(fed.root), "ghost"]) == 2
    assert "not registered" in capsys.readouterr().err


def test_party_files_do_not_grow_with_the_fleet(make_federation):
    small = make_federation("scalefed", ["c0", "c1"])
    big = make_federation("scalefed", [f"c{i}" for i in range(300)])

    def size(fed, pid):
        return sum(
            f.stat().st_size for f in fed.party_dir(pid).iterdir() if f.name != "config.json"
        )

    # same-length ids: a client's files have the same size whatever the fleet size (a key and a
    # certificate vary by a few bytes of DER)
    assert abs(size(small, "c0") - size(big, "c0")) < 16
    assert abs(size(small, "aggregator") - size(big, "aggregator")) < 16
    assert small.acl.read_text() == big.acl.read_text()
    assert read_json(big.federation_json)["directory"]["parties"].keys() == {"aggregator"}
    assert len(load_party_config(big.party_config("aggregator")).directory) == 301
