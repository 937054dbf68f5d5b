"""Typed errors of the wire. Every failure a receiver can meet has its own class, so callers
and counters can tell them apart; all derive from :class:`BridgeError`."""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error raised by :mod:`bridge`."""

    #: short stable name used in counters, logs and typed error messages on the wire
    code = "bridge_error"


class MalformedMessage(BridgeError):
    """Bytes that do not parse as a cotune envelope or message (bad framing, bad JSON, bad
    field types, missing fields, bad tensor section)."""

    code = "malformed"


class UnsupportedVersion(MalformedMessage):
    """A message or envelope written by a wire version this build cannot read."""

    code = "unsupported_version"


class TamperedMessage(BridgeError):
    """Signature or AEAD tag does not verify: the header or body changed after signing, or
    the message was signed by a key other than the claimed sender's."""

    code = "tampered"


class ReplayedMessage(BridgeError):
    """A message id seen before inside the replay window, or a timestamp outside the allowed
    clock skew (too old to be checked against the window, or from the future)."""

    code = "replayed"


class StaleRound(BridgeError):
    """A message for a round that is already closed on the receiving side."""

    code = "stale_round"


class UnknownSender(BridgeError):
    """The sender id is not in the federation directory (not provisioned, or revoked)."""

    code = "unknown_sender"


class UnknownRecipient(BridgeError):
    """A message addressed to a party that is not in the directory, or not to this receiver."""

    code = "unknown_recipient"


class Revoked(UnknownSender, UnknownRecipient):
    """The party was enrolled once and has been revoked: its messages are refused and nothing
    is sent to it. A subclass of both unknown-party errors, so handlers of those still apply."""

    code = "revoked"


class OversizedMessage(BridgeError):
    """A payload above the configured limit. Raised by senders before anything is published
    and by receivers before any decryption work is done."""

    code = "oversized"


class ConfigurationError(BridgeError, ValueError):
    """A setting of the wire (endpoint, broker connection, party config) is out of range."""

    code = "config"


class ResourceLimit(BridgeError):
    """A sender asked for more than the receiver gives one party: a blob above the size the
    receiver expects of that kind, too many transfers at once, too many bytes in flight."""

    code = "resource_limit"


class RateLimited(BridgeError):
    """A sender's frames arrive faster than its allowance; the excess is dropped unopened."""

    code = "rate_limited"


class BlobIntegrityError(BridgeError):
    """A reassembled blob (or one of its chunks) does not match its content hash."""

    code = "blob_integrity"


class TransportError(BridgeError):
    """The MQTT connection could not be made or was refused by the broker."""

    code = "transport"


class ProvisioningError(BridgeError):
    """A federation directory is missing, incomplete or inconsistent."""

    code = "provisioning"
