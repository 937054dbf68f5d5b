"""The federation CA's certificate work: the CA itself, party and broker certificates, the
certificate revocation list, and the X.509 extension that binds a party's envelope keys (Ed25519
signing key, X25519 agreement key) to its certificate.

Binding the envelope keys into the certificate is what lets a device that holds only the CA
certificate verify keys relayed to it by the aggregator (:func:`certified_identity`): the
aggregator cannot substitute them without a CA signature.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from .errors import ProvisioningError
from .keys import PublicIdentity

#: Non-critical extension "cotune envelope keys" (an OID under the UUID arc 2.25, which needs no
#: registration): DER ``SEQUENCE { OCTET STRING sign_pub(32), OCTET STRING kx_pub(32),
#: UTF8String role }``. TLS stacks (Mosquitto's OpenSSL) ignore it; cotune reads it.
ENVELOPE_KEYS_OID = ObjectIdentifier("2.25.193358915486092718904184645272882443456")


# ---------------------------------------------------------------------------------------------
# The envelope-keys extension


def envelope_keys_extension(party: PublicIdentity) -> x509.UnrecognizedExtension:
    role = party.role.encode("utf-8")
    body = _der(0x04, party.sign_pub) + _der(0x04, party.kx_pub) + _der(0x0C, role)
    return x509.UnrecognizedExtension(ENVELOPE_KEYS_OID, _der(0x30, body))


def envelope_keys(obj: x509.Certificate | x509.CertificateSigningRequest, party_id: str):
    """The PublicIdentity bound into a certificate or CSR, or None when it has no such
    extension (certificates of older federations). ProvisioningError if it is malformed."""
    try:
        ext = obj.extensions.get_extension_for_oid(ENVELOPE_KEYS_OID)
    except x509.ExtensionNotFound:
        return None
    try:
        seq, rest = _undER(ext.value.value, 0x30)
        sign_pub, seq = _undER(seq, 0x04)
        kx_pub, seq = _undER(seq, 0x04)
        role, seq = _undER(seq, 0x0C)
        if rest or seq:
            raise ValueError("trailing bytes")
        return PublicIdentity(party_id, role.decode("utf-8"), sign_pub, kx_pub)
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ProvisioningError(f"malformed envelope-keys extension ({exc})") from exc


def _der(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + value


def _undER(data: bytes, tag: int) -> tuple[bytes, bytes]:
    if len(data) < 2 or data[0] != tag:
        raise ValueError(f"expected DER tag {tag:#x}")
    n, pos = data[1], 2
    if n & 0x80:
        width = n & 0x7F
        n, pos = int.from_bytes(data[2 : 2 + width], "big"), 2 + width
    if pos + n > len(data):
        raise ValueError("DER length past the end")
    return data[pos : pos + n], data[pos + n :]


def certified_identity(
    cert: x509.Certificate, ca_cert: x509.Certificate, party_id: str | None = None
) -> PublicIdentity:
    """Verify that ``cert`` was issued by the federation CA (signature and validity period) for
    ``party_id`` (its CN) and return the envelope keys it certifies. This is how a device that
    holds only ``ca.crt`` checks public keys the aggregator relays to it."""
    cn = common_name(cert)
    if party_id is not None and cn != party_id:
        raise ProvisioningError(f"certificate is for {cn!r}, expected {party_id!r}")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProvisioningError(
            f"certificate of {cn!r} is not issued by the federation CA"
        ) from exc
    now = now_utc()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ProvisioningError(f"certificate of {cn!r} is not valid now (expired or not yet)")
    ident = envelope_keys(cert, cn)
    if ident is None:
        raise ProvisioningError(f"certificate of {cn!r} certifies no envelope keys")
    return ident


def common_name(obj: x509.Certificate | x509.CertificateSigningRequest) -> str:
    attrs = obj.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        raise ProvisioningError("certificate subject must have exactly one common name")
    return str(attrs[0].value)


# ---------------------------------------------------------------------------------------------
# Issuing


def make_ca(federation: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cotune"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"cotune {federation} CA"),
        ]
    )
    now = now_utc()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_certificate(
    ca_key,
    ca_cert: x509.Certificate,
    public_key,
    cn: str,
    federation: str,
    *,
    sans: Iterable[str] = (),
    server: bool = False,
    days: int,
    identity: PublicIdentity | None = None,
) -> x509.Certificate:
    """A leaf certificate for ``public_key`` (CN = party id or broker host). ``identity``: the
    party's envelope keys, bound in with :data:`ENVELOPE_KEYS_OID`."""
    now = now_utc()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cotune"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    names = [_general_name(s) for s in sans]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if identity is not None:
        builder = builder.add_extension(envelope_keys_extension(identity), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def issue(
    ca_key,
    ca_cert: x509.Certificate,
    cn: str,
    federation: str,
    *,
    sans: Iterable[str],
    server: bool,
    days: int,
    identity: PublicIdentity | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Central key generation (labs, tests, the broker's own key): a new TLS key and its
    certificate. Enrolled devices make their key themselves and send a CSR instead."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_certificate(
        ca_key,
        ca_cert,
        key.public_key(),
        cn,
        federation,
        sans=sans,
        server=server,
        days=days,
        identity=identity,
    )
    return key, cert


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


# ---------------------------------------------------------------------------------------------
# Revocation list


def make_crl(ca_key, ca_cert: x509.Certificate, revoked: Iterable[tuple[int, float]]) -> bytes:
    """PEM CRL of ``(serial, revoked_at unix time)`` pairs. ``nextUpdate`` is the CA's expiry:
    the only consumer is the federation's own broker, which re-reads the file on SIGHUP, and
    OpenSSL refuses *every* client once a CRL's nextUpdate has passed."""
    now = now_utc()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
    )
    for serial, at in revoked:
        when = dt.datetime.fromtimestamp(at, dt.timezone.utc)
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when)
        builder = builder.add_revoked_certificate(entry.build())
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def load_ca(ca_key_path, ca_cert_path):
    """(key, cert) of the federation CA; ProvisioningError when the key is not on this machine."""
    try:
        key_pem = open(ca_key_path, "rb").read()
    except FileNotFoundError:
        raise ProvisioningError(
            f"{ca_key_path} is missing: this needs the federation CA key (run it on the machine "
            "that provisioned the federation)"
        ) from None
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key, x509.load_pem_x509_certificate(open(ca_cert_path, "rb").read())


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
