"""Provisioning: files, permissions, certificates, ACL, password file, configs."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import pwd
import shutil
import ssl
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.ca import certified_identity
from bridge.errors import ProvisioningError
from bridge.keys import read_json
from bridge.provision import (
    FederationPaths,
    add_client,
    load_party_config,
    mosquitto_password_hash,
    provision,
    verify_mosquitto_password,
)

PARTIES = ["aggregator", "alice", "bob", "carol"]


def mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def cert(p) -> x509.Certificate:
    return x509.load_pem_x509_certificate(p.read_bytes())


def cn(c: x509.Certificate) -> str:
    return c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def broker_user_exists() -> bool:
    try:
        pwd.getpwnam("mosquitto")
        return True
    except KeyError:
        return False


def test_layout_and_permissions(federation: FederationPaths):
    fed = federation
    for p in [
        fed.federation_json,
        fed.ca_cert,
        fed.ca_key,
        fed.server_cert,
        fed.server_key,
        fed.mosquitto_conf,
        fed.acl,
        fed.passwd,
        fed.registry,
        fed.crl,
    ]:
        assert p.is_file(), p
    assert fed.data_dir.is_dir()
    assert mode(fed.root) == 0o755  # mkdtemp's 0700 would lock the broker user out
    assert mode(fed.federation_json) == 0o644
    assert mode(fed.ca_cert) == 0o644
    assert mode(fed.crl) == 0o644 and mode(fed.registry) == 0o644  # public data only
    for secret in (fed.ca_key, fed.server_key, fed.passwd):
        assert mode(secret) == 0o600, secret
    for pid in PARTIES:
        d = fed.party_dir(pid)
        assert mode(d) == 0o700
        # the aggregator also holds its ingest workers' broker identities (the fixture asks for 1)
        extra = {"instances"} if pid == "aggregator" else set()
        assert {p.name for p in d.iterdir()} == {
            "config.json",
            "identity.json",
            "client.crt",
            "client.key",
            "ca.crt",
            "federation.json",
        } | extra
        for secret in ("config.json", "identity.json", "client.key"):
            assert mode(d / secret) == 0o600, d / secret
    inst = fed.party_dir("aggregator") / "instances"
    assert sorted(p.name for p in inst.iterdir()) == ["ingest-0.crt", "ingest-0.key"]
    assert mode(inst) == 0o700 and mode(inst / "ingest-0.key") == 0o600
    assert not list(fed.root.rglob("*.tmp")) and not list(fed.parties_dir.glob(".*"))

    doc = read_json(fed.federation_json)
    assert doc["federation"] == "testfed"
    assert doc["broker"] == {
        "host": "127.0.0.1",
        "port": fed.port,
        "tls": True,
        "password_port": fed.password_port,
    }
    assert doc["max_packet_bytes"] == 1_048_576
    # the federation file names the aggregator only; everyone else is in the registry
    assert sorted(doc["directory"]["parties"]) == ["aggregator"]
    assert doc["registry"] == "registry.db"
    assert sorted(p.party_id for p in fed.directory()) == PARTIES
    assert FederationPaths.open(fed.root) == fed
    # a client's copy of federation.json is the same small file for every client
    copies = {(fed.party_dir(c) / "federation.json").read_bytes() for c in PARTIES[1:]}
    assert len(copies) == 1
    assert sorted(json.loads(copies.pop())["directory"]["parties"]) == ["aggregator"]


@pytest.mark.skipif(
    os.geteuid() != 0 or not broker_user_exists(),
    reason="ownership hand-over happens only as root with a 'mosquitto' user",
)
def test_broker_files_belong_to_broker_user(federation: FederationPaths):
    uid = pwd.getpwnam("mosquitto").pw_uid
    for p in (
        federation.mosquitto_conf,
        federation.acl,
        federation.passwd,
        federation.server_key,
        federation.server_cert,
        federation.data_dir,
    ):
        assert os.stat(p).st_uid == uid, p
    assert os.stat(federation.ca_key).st_uid == 0  # the CA key is never the broker's


def test_party_configs_load(federation: FederationPaths):
    for pid in PARTIES:
        cfg = load_party_config(federation.party_config(pid))
        assert (cfg.party_id, cfg.federation) == (pid, "testfed")
        assert cfg.role == ("aggregator" if pid == "aggregator" else "client")
        assert (cfg.host, cfg.port, cfg.password_port) == (
            "127.0.0.1",
            federation.port,
            federation.password_port,
        )
        assert cfg.tls and cfg.client_cert.is_file() and cfg.ca_cert.is_file()
        assert cfg.identity.public == cfg.directory.recipient(pid)
        # the aggregator knows every client (from the registry); a client itself + aggregator
        want = ["alice", "bob", "carol"] if pid == "aggregator" else [pid]
        assert cfg.directory.clients() == want and len(cfg.directory) == len(want) + 1
        assert cfg.aggregator_id == "aggregator"
        assert cfg.max_packet_bytes == 1_048_576 and cfg.password
        assert cfg.topics.down(pid) == f"cotune/testfed/down/{pid}"
    # the party directory is accepted in place of its config file
    assert load_party_config(federation.party_dir("bob")).party_id == "bob"


def test_party_directory_is_self_contained(federation: FederationPaths, tmp_path):
    device = tmp_path / "device" / "cotune"
    shutil.copytree(federation.party_dir("alice"), device)
    cfg = load_party_config(device / "config.json")
    assert cfg.client_key == device / "client.key"
    assert cfg.federation_file == device / "federation.json"
    # and usable for TLS as it is
    ctx = ssl.create_default_context(cafile=str(cfg.ca_cert))
    ctx.load_cert_chain(str(cfg.client_cert), str(cfg.client_key))


def test_load_party_config_rejects_broken_configs(federation: FederationPaths, tmp_path):
    alice = tmp_path / "alice"
    shutil.copytree(federation.party_dir("alice"), alice)
    with pytest.raises(ProvisioningError, match="missing file"):
        load_party_config(tmp_path / "nobody" / "config.json")

    (alice / "client.key").unlink()
    with pytest.raises(ProvisioningError, match="client key"):
        load_party_config(alice)
    shutil.copy(federation.party_dir("alice") / "client.key", alice / "client.key")

    # bob's identity in alice's directory: the keys do not belong to alice
    shutil.copy(federation.party_dir("bob") / "identity.json", alice / "identity.json")
    with pytest.raises(ProvisioningError, match="identity file is for 'bob'"):
        load_party_config(alice)
    shutil.copy(federation.party_dir("alice") / "identity.json", alice / "identity.json")

    # bob's certificate in alice's directory: not alice's, and it certifies other keys
    shutil.copy(federation.party_dir("bob") / "client.crt", alice / "client.crt")
    with pytest.raises(ProvisioningError, match="certificate is for 'bob'"):
        load_party_config(alice)
    shutil.copy(federation.party_dir("alice") / "client.crt", alice / "client.crt")

    # a substituted aggregator key in the client's federation file: the aggregator's
    # certificate (checked against ca.crt) certifies other keys
    doc = read_json(alice / "federation.json")
    real = doc["directory"]["parties"]["aggregator"]["kx_pub"]
    doc["directory"]["parties"]["aggregator"]["kx_pub"] = base64.b64encode(b"x" * 32).decode()
    (alice / "federation.json").write_text(json.dumps(doc))
    with pytest.raises(ProvisioningError, match="not the ones its certificate certifies"):
        load_party_config(alice)
    doc["directory"]["parties"]["aggregator"]["kx_pub"] = real
    (alice / "federation.json").write_text(json.dumps(doc))
    assert load_party_config(alice).party_id == "alice"

    cfg = read_json(alice / "config.json")
    del cfg["broker"]["port"]
    (alice / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ProvisioningError, match="broker.'port'"):
        load_party_config(alice)


def test_certificates_chain_to_the_ca(make_federation):
    fed = make_federation(extra_hosts=["broker.example.org", "10.1.2.3"])
    ca = cert(fed.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3649)

    server = cert(fed.server_cert)
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.example.org"}
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {
        "127.0.0.1",
        "::1",
        "10.1.2.3",
    }
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku

    for pid in PARTIES:
        c = cert(fed.party_dir(pid) / "client.crt")
        c.verify_directly_issued_by(ca)
        assert cn(c) == pid
        assert (
            ExtendedKeyUsageOID.CLIENT_AUTH
            in c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        )
        assert not c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert c.not_valid_after_utc <= ca.not_valid_after_utc
        assert (fed.party_dir(pid) / "ca.crt").read_bytes() == fed.ca_cert.read_bytes()
        # the certificate certifies the party's envelope keys: a holder of ca.crt alone can
        # check keys relayed to it
        ident = load_party_config(fed.party_dir(pid)).identity
        assert certified_identity(c, ca, pid) == ident.public


def test_acl_file(federation: FederationPaths):
    lines = [ln for ln in federation.acl.read_text().splitlines() if ln and not ln.startswith("#")]
    # no per-client lines: the ACL does not grow with the fleet (revoked parties aside)
    assert lines == [
        "user aggregator",
        "topic readwrite cotune/testfed/#",
        "user aggregator~ingest-0",  # the aggregator's ingest worker (one per worker)
        "topic readwrite cotune/testfed/#",
        "pattern read cotune/testfed/bcast",
        "pattern read cotune/testfed/down/%u",
        "pattern write cotune/testfed/up/%u",
        "pattern write cotune/testfed/status/%u",
    ]


def test_mosquitto_conf(federation: FederationPaths):
    conf = federation.mosquitto_conf.read_text().splitlines()
    for line in [
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {federation.acl}",
        f"password_file {federation.passwd}",
        "persistence true",
        f"persistence_location {federation.data_dir}/",
        f"max_packet_size {1_048_576 + 16 * 1024}",
        "max_queued_messages 10000",
        "max_inflight_messages 100",
        "log_dest stdout",
        "connection_messages true",
        f"listener {federation.port} 127.0.0.1",
        f"listener {federation.password_port} 127.0.0.1",
        f"cafile {federation.ca_cert}",
        f"crlfile {federation.crl}",
        "require_certificate true",
        "use_identity_as_username true",
        "tls_version tlsv1.2",
        "require_certificate false",
    ]:
        assert line in conf, line
    assert conf.index("use_identity_as_username true") < conf.index(
        f"listener {federation.password_port} 127.0.0.1"
    )


def test_password_file_is_mosquitto_format(federation: FederationPaths, tmp_path):
    entries = dict(ln.split(":", 1) for ln in federation.passwd.read_text().splitlines())
    assert sorted(entries) == PARTIES
    for pid, hashed in entries.items():
        empty, seven, iterations, salt, digest = hashed.split("$")
        assert (empty, seven, iterations) == ("", "7", "101")
        assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64
        password = load_party_config(federation.party_dir(pid)).password
        assert verify_mosquitto_password(hashed, password)
        assert not verify_mosquitto_password(hashed, password + "x")
    # same algorithm as Mosquitto's own tool: verify a hash that mosquitto_passwd wrote
    tool = shutil.which("mosquitto_passwd")
    if tool:
        pwfile = tmp_path / "pw"
        subprocess.run(
            [tool, "-c", "-b", str(pwfile), "dave", "s3cret"], check=True, capture_output=True
        )
        theirs = pwfile.read_text().strip().split(":", 1)[1]
        assert verify_mosquitto_password(theirs, "s3cret")
    salt = b"0123456789ab"
    assert mosquitto_password_hash("pw", salt=salt) == mosquitto_password_hash("pw", salt=salt)


def test_refuses_to_overwrite(make_federation):
    fed = make_federation()
    with pytest.raises(ProvisioningError, match="force=True"):
        provision(fed.root, "testfed", ["alice"])
    old = read_json(fed.federation_json)
    again = provision(fed.root, "testfed", ["zed"], force=True, port=fed.port)
    assert again.directory().clients() == ["zed"]
    assert read_json(again.federation_json)["directory"] != old["directory"]
    assert not fed.party_dir("alice").exists()

    stranger = fed.root.parent / "not-a-federation"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("keep me")
    with pytest.raises(ProvisioningError, match="refusing to delete"):
        provision(stranger, "testfed", ["alice"], force=True)
    assert (stranger / "precious.txt").exists()


@pytest.mark.parametrize(
    "clients,aggregator,match",
    [
        (["alice", "alice"], "aggregator", "unique"),
        (["alice", "aggregator"], "aggregator", "unique"),
        (["al/ice"], "aggregator", "invalid party id"),
        (["alice"], "agg#", "invalid party id"),
    ],
)
def test_rejects_bad_party_ids(tmp_path, clients, aggregator, match):
    with pytest.raises(ProvisioningError, match=match):
        provision(tmp_path / "fed", "testfed", clients, aggregator_id=aggregator)


def test_add_client(make_federation):
    fed = make_federation(clients=["alice"])
    add_client(fed.root, "dave")
    directory = fed.directory()
    assert directory.clients() == ["alice", "dave"]
    dave = load_party_config(fed.party_config("dave"))
    assert dave.role == "client" and dave.directory.clients() == ["dave"]
    cert(fed.party_dir("dave") / "client.crt").verify_directly_issued_by(cert(fed.ca_cert))
    # the aggregator's directory knows dave; no other party's files changed
    assert "dave" in load_party_config(fed.party_config("aggregator")).directory
    alice = fed.party_dir("alice")
    assert (alice / "federation.json").read_bytes() == (
        fed.party_dir("dave") / "federation.json"
    ).read_bytes()
    assert "dave:$7$" in fed.passwd.read_text()
    assert verify_mosquitto_password(
        dict(ln.split(":", 1) for ln in fed.passwd.read_text().splitlines())["dave"], dave.password
    )
    assert "dave" not in fed.acl.read_text()  # the patterns cover it
    with pytest.raises(ProvisioningError, match="already exists"):
        add_client(fed.root, "dave")


@pytest.mark.skipif(
    os.geteuid() != 0 or not broker_user_exists(),
    reason="the traversal check applies when a root-started broker drops to the 'mosquitto' user",
)
def test_untraversable_parent_is_reported(tmp_path_factory):
    locked = tmp_path_factory.mktemp("locked")
    os.chmod(locked, 0o700)
    with pytest.raises(ProvisioningError, match=f"chmod o\\+x {locked}"):
        provision(locked / "fed", "testfed", ["alice"])
    assert not (locked / "fed").exists()  # checked before anything was written
    # a federation only ever served by the embedded broker may live there
    provision(locked / "fed", "testfed", ["alice"], check_access=False)


def test_dns_host_listens_on_every_interface(make_federation):
    from bridge.broker import read_listeners

    fed = make_federation(host="broker.example.org")
    assert read_listeners(fed.mosquitto_conf) == [
        ("0.0.0.0", fed.port),
        ("0.0.0.0", fed.password_port),
    ]
    assert load_party_config(fed.party_dir("alice")).host == "broker.example.org"
    server = cert(fed.server_cert)
    assert cn(server) == "broker.example.org"
    pinned = make_federation(host="broker.example.org", bind_host="10.0.0.7")
    assert read_listeners(pinned.mosquitto_conf)[0] == ("10.0.0.7", pinned.port)
