"""A device's half of one secure round, message by message (see aggregator/secure_round.py for
the steps and :mod:`bridge.secagg` for the cryptography).

The session is transport-free: each ``on_*`` method takes the aggregator's message and returns
what to send back, so the edge SDK's loop and the fleet simulator's virtual devices drive the
same code. The neighbours' keys arrive through the aggregator: each one is accepted only with a
certificate issued by the federation CA for that neighbour (or, for a party provisioned with the
whole directory, the key the directory holds), so the aggregator cannot substitute its own keys.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np
from cryptography import x509

from .ca import certified_identity
from .errors import ProvisioningError
from .keys import Directory, Identity, b64e
from .messages import SecAggKeys, SecAggNeighbours, SecAggReveal, SecAggShares, SecAggUnmask
from .secagg import SecAggAbort, SecAggClient, SecAggParams


class ClientSession:
    """One client's secure round ``round``: keys -> shares -> masked input -> reveal."""

    def __init__(self, identity: Identity, federation: str, round: int, params: SecAggParams,
                 values: np.ndarray, weight: float, *, cert_pem: str = "", ca_cert: x509.Certificate | None = None,
                 directory: Directory | None = None):
        self.party_id, self.round, self.params = identity.party_id, int(round), params
        self._values, self._weight = values, float(weight)
        self._cert_pem, self._ca, self._directory = cert_pem, ca_cert, directory
        self._client = SecAggClient(identity.party_id, federation, self.round, params, identity.sign_key)
        self.step = "new"

    def start(self) -> SecAggKeys:
        ad = self._client.advertise()
        self.step = "advertised"
        return SecAggKeys(self.round, ad["c_pk"], ad["s_pk"], ad["sig"], cert=self._cert_pem)

    def on_neighbours(self, msg: SecAggNeighbours) -> SecAggShares:
        self._expect(msg, "advertised", "shared")
        checked = {v: {**ad, "sign_pub": b64e(self._signing_key(v, ad))} for v, ad in msg.neighbours.items()}
        cts = self._client.share_keys(checked)
        return SecAggShares(self.round, {v: base64.b64encode(ct).decode("ascii") for v, ct in cts.items()})

    def on_shares(self, msg: SecAggShares) -> np.ndarray:
        """The neighbours' shares (relayed) -> this client's masked input (uint32)."""
        self._expect(msg, "shared", "masked")
        self._client.receive_shares({u: base64.b64decode(ct) for u, ct in msg.shares.items()})
        masked = self._client.masked_input(self._values, self._weight)
        self._values = None  # the plain input is not kept past its masking
        return masked

    def on_unmask(self, msg: SecAggUnmask) -> SecAggReveal:
        self._expect(msg, "masked", "revealed")
        return SecAggReveal(self.round, self._client.reveal(msg.survivors, msg.dropped))

    # -----------------------------------------------------------------------------------
    def _expect(self, msg, step: str, then: str) -> None:
        if msg.round != self.round:
            raise SecAggAbort("bad_request", f"{msg.TYPE} for round {msg.round} in round {self.round}")
        if self.step != step:
            raise SecAggAbort("bad_request", f"{msg.TYPE} arrived at step {self.step!r}, expected after {step!r}")
        self.step = then

    def _signing_key(self, party: str, ad: Mapping) -> bytes:
        """The neighbour's Ed25519 key, from a CA-issued certificate or this party's directory;
        never from the relayed ``sign_pub`` alone."""
        pem = ad.get("cert") or ""
        if self._ca is not None and pem:
            try:
                cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
                ident = certified_identity(cert, self._ca, party)
            except (ValueError, ProvisioningError) as exc:
                raise SecAggAbort("bad_signature", f"neighbour {party!r}: {exc}") from None
            return ident.sign_pub
        if self._directory is not None and party in self._directory:
            return self._directory.sender(party).sign_pub
        raise SecAggAbort("bad_signature", f"neighbour {party!r}: no certificate and not in this party's directory; "
                                          "its keys cannot be verified")


def secure_params(task_config: Mapping) -> tuple[SecAggParams, float, int, float]:
    """(params, clip, weight_cap, noise_std) from a Task's ``secure_aggregation`` config."""
    sa = task_config["secure_aggregation"]
    try:
        return (SecAggParams.from_json(sa["params"]), float(sa["clip"]), int(sa["weight_cap"]),
                float(sa["noise_std"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SecAggAbort("bad_request", f"malformed secure_aggregation task config: {exc}") from None


def value_range(clip: float, noise_std: float) -> float:
    """The per-coordinate range the fixed-point encoding must hold: a clipped delta's coordinate
    is at most ``clip``; a noise share stays within eight deviations (probability < 1e-15)."""
    return float(clip) + 8.0 * float(noise_std)


def secure_task_config(params: SecAggParams, clip: float, weight_cap: int, noise_std: float) -> dict:
    """What a Task's ``secure_aggregation`` carries (read back by :func:`secure_params`)."""
    return {"params": params.to_json(), "clip": float(clip), "weight_cap": int(weight_cap),
            "noise_std": float(noise_std)}


def session_for(party, round: int, params: SecAggParams, values: np.ndarray, weight: float) -> ClientSession:
    """A session for a provisioned party (:class:`bridge.provision.PartyConfig`): its certificate
    is advertised, its CA checks the neighbours'."""
    ca = x509.load_pem_x509_certificate(party.ca_cert.read_bytes()) if party.ca_cert else None
    cert = party.client_cert.read_text() if party.client_cert else ""
    return ClientSession(party.identity, party.federation, round, params, values, weight, cert_pem=cert,
                         ca_cert=ca, directory=party.directory)
