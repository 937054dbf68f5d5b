"""Party identities: an Ed25519 signing key and an X25519 key-agreement key per party, and the
directory of the public keys a party needs (a client: itself and the aggregator; the aggregator:
every active client, read from the federation's registry, see :mod:`bridge.registry`).

On disk both are small JSON files with raw keys in base64 (no PEM parsing on the hot path);
private identity files are written with mode 0600.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from .errors import ProvisioningError, Revoked, UnknownRecipient, UnknownSender

ROLES = ("aggregator", "client")


def b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64d(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _raw_public(key) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


@dataclass(frozen=True)
class PublicIdentity:
    """What every party may know about another party."""

    party_id: str
    role: str
    sign_pub: bytes  # Ed25519, 32 bytes raw
    kx_pub: bytes  # X25519, 32 bytes raw

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ProvisioningError(f"party {self.party_id!r}: role must be one of {ROLES}, got {self.role!r}")
        if len(self.sign_pub) != 32 or len(self.kx_pub) != 32:
            raise ProvisioningError(f"party {self.party_id!r}: public keys must be 32 raw bytes")
        validate_party_id(self.party_id)

    @property
    def verify_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.sign_pub)

    @property
    def kx_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.kx_pub)

    def to_json(self) -> dict:
        return {"role": self.role, "sign_pub": b64e(self.sign_pub), "kx_pub": b64e(self.kx_pub)}

    @classmethod
    def from_json(cls, party_id: str, data: dict) -> PublicIdentity:
        try:
            return cls(party_id, data["role"], b64d(data["sign_pub"]), b64d(data["kx_pub"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProvisioningError(f"party {party_id!r}: bad public identity ({exc})") from exc


def validate_party_id(party_id: str) -> None:
    """Party ids become MQTT topic levels and certificate CNs: keep them to a safe alphabet."""
    ok = party_id and len(party_id) <= 64 and all(c.isalnum() or c in "-_." for c in party_id)
    if not ok:
        raise ProvisioningError(
            f"invalid party id {party_id!r}: use 1-64 characters from [A-Za-z0-9._-] "
            "(ids are used as MQTT topic levels and certificate names)"
        )


@dataclass(frozen=True)
class Identity:
    """A party's private keys. Never leaves the party's machine."""

    party_id: str
    role: str
    sign_key: Ed25519PrivateKey = field(repr=False)
    kx_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, party_id: str, role: str) -> Identity:
        validate_party_id(party_id)
        return cls(party_id, role, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.party_id, self.role, _raw_public(self.sign_key.public_key()),
                              _raw_public(self.kx_key.public_key()))

    def to_json(self) -> dict:
        return {
            "party_id": self.party_id,
            "role": self.role,
            "sign_key": b64e(_raw_private(self.sign_key)),
            "kx_key": b64e(_raw_private(self.kx_key)),
        }

    @classmethod
    def from_json(cls, data: dict) -> Identity:
        try:
            return cls(
                data["party_id"],
                data["role"],
                Ed25519PrivateKey.from_private_bytes(b64d(data["sign_key"])),
                X25519PrivateKey.from_private_bytes(b64d(data["kx_key"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProvisioningError(f"bad identity file ({exc})") from exc

    def save(self, path: str | os.PathLike) -> None:
        write_private_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        return cls.from_json(read_json(Path(path)))


class Directory:
    """Public keys of the parties one party talks to: who may send, who may receive.

    ``revoked`` names parties that were enrolled and then revoked: :meth:`sender` and
    :meth:`recipient` raise :class:`~bridge.errors.Revoked` for them (an unknown id raises
    UnknownSender / UnknownRecipient). A plain Directory is static; :meth:`refresh` is the hook
    through which a registry-backed one (:class:`bridge.registry.RegistryDirectory`) picks up
    enrollments and revocations. Lookups read one dict reference, which a refresh replaces
    whole, so readers on other threads never see a half-applied change.
    """

    def __init__(self, federation: str, parties: Iterable[PublicIdentity], *,
                 revoked: Iterable[str] = ()):
        self.federation = federation
        table: dict[str, PublicIdentity] = {}
        for p in parties:
            if p.party_id in table:
                raise ProvisioningError(f"duplicate party id {p.party_id!r} in directory")
            table[p.party_id] = p
        self._parties = table
        self._revoked = frozenset(revoked)
        self._aggregators = [p.party_id for p in table.values() if p.role == "aggregator"]

    def __contains__(self, party_id: str) -> bool:
        return party_id in self._parties

    def __iter__(self):
        return iter(list(self._parties.values()))

    def __len__(self) -> int:
        return len(self._parties)

    def refresh(self) -> bool:
        """Pick up changes from the directory's source; True when something changed. A static
        directory has no source and never changes."""
        return False

    def is_revoked(self, party_id: str) -> bool:
        return party_id in self._revoked

    def sender(self, party_id: str) -> PublicIdentity:
        try:
            return self._parties[party_id]
        except KeyError:
            if party_id in self._revoked:
                raise Revoked(f"sender {party_id!r} has been revoked from federation "
                              f"{self.federation!r}") from None
            raise UnknownSender(f"sender {party_id!r} is not in federation {self.federation!r}") from None

    def recipient(self, party_id: str) -> PublicIdentity:
        try:
            return self._parties[party_id]
        except KeyError:
            if party_id in self._revoked:
                raise Revoked(f"recipient {party_id!r} has been revoked from federation "
                              f"{self.federation!r}") from None
            raise UnknownRecipient(
                f"recipient {party_id!r} is not in federation {self.federation!r}"
            ) from None

    def clients(self) -> list[str]:
        return sorted(p.party_id for p in self._parties.values() if p.role == "client")

    def aggregator(self) -> str:
        aggs = self._aggregators  # kept at construction: this is on the send path
        if len(aggs) != 1:
            raise ProvisioningError(f"federation {self.federation!r} must have exactly one aggregator, has {aggs}")
        return aggs[0]

    def with_party(self, party: PublicIdentity) -> Directory:
        return Directory(self.federation, [*self._parties.values(), party], revoked=self._revoked)

    def to_json(self) -> dict:
        return {"federation": self.federation,
                "parties": {p.party_id: p.to_json() for p in self._parties.values()}}

    @classmethod
    def from_json(cls, data: dict) -> Directory:
        try:
            fed = data["federation"]
            parties = [PublicIdentity.from_json(pid, d) for pid, d in data["parties"].items()]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ProvisioningError(f"bad directory ({exc})") from exc
        return cls(fed, parties)

    def save(self, path: str | os.PathLike) -> None:
        write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Directory:
        return cls.from_json(read_json(Path(path)))


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ProvisioningError(f"missing file {path}") from None
    except json.JSONDecodeError as exc:
        raise ProvisioningError(f"{path} is not valid JSON: {exc}") from exc


def write_json(path: Path, data: dict, mode: int = 0o644) -> None:
    """Atomic write: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_private_json(path: Path, data: dict) -> None:
    write_json(path, data, mode=0o600)
