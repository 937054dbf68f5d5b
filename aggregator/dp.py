"""Client-level differential privacy for the averaged algorithms (DP-FedAvg, McMahan et al.
2018, "Learning Differentially Private Recurrent Language Models").

Central mode (the server is trusted with individual updates, the released globals are
private): each accepted update's delta to the round's global is clipped to L2 norm ``clip``
(C); the deltas are summed unweighted (every client counts once, whatever it claims as
num_examples), Gaussian noise N(0, (z C)^2) is added to every coordinate of the sum, and the
noisy sum is divided by a *fixed* denominator: ``expected_clients`` when configured, else the
number of clients selected for the round (the fixed-denominator estimator of DP-FedAvg). One
client added or removed moves the sum by at most C, so the noise multiplier z is the
mechanism's; the division is post-processing. A round whose quorum is not met releases nothing
and costs nothing.

Local mode (no trusted server): each client clips its own delta to C and adds N(0, (z C)^2)
before upload; the server takes the unweighted mean of what it accepted and adds nothing. The
server sees every noisy update, so there is no amplification by sampling, and one client's
data can move its clipped delta anywhere in the ball of radius C (a change of up to 2C): the
per-client guarantee is that of a Gaussian mechanism with noise multiplier z/2, composed once
per round (conservatively, as if the client took part in every round).

Accounting: ``dp_accounting``'s RDP accountant (or its PLD accountant, ``"accountant": "pld"``)
composes, per released round, ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` with q = the
round's selected / eligible clients. The service draws a fixed-size sample without replacement;
the Poisson analysis with the same q is the usual approximation (as in DP-FedAvg and TensorFlow
Federated), not an exact bound for fixed-size sampling. Amplification also assumes the
selection is not revealed to the adversary.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from algorithms.core.client_dp import noise_rng

from .errors import AggregatorError, InvalidUpdate
from .validation import UpdateSpec, ValidatedUpdate, encode, to_float64, validate_update

MODES = ("central", "local")
ACCOUNTANTS = ("rdp", "pld")
#: RDP orders: integers only (the fractional orders below 2 often fail to converge in the
#: library for small q and z, and rarely give the minimum for the settings used here)
RDP_ORDERS = tuple(range(2, 64)) + (80, 96, 128, 192, 256, 384, 512, 1024)
#: algorithms whose updates are averaged (FedMKT collects logits: no DP here)
AVERAGED = ("fedavg", "fedcollm", "fedpt", "fedbiot")


class DPConfigError(AggregatorError, ValueError):
    code = "config"


class PrivacyBudgetExhausted(AggregatorError):
    """Opening the next round would spend more than ``epsilon_budget``: no round is opened."""

    code = "dp_budget"

    def __init__(self, round: int, epsilon_next: float, budget: float, epsilon_spent: float):
        super().__init__(f"privacy budget: round {round} would bring epsilon to {epsilon_next:.4g} "
                         f"> budget {budget:.4g} (spent {epsilon_spent:.4g}); no round opened")
        self.round, self.epsilon_next, self.budget, self.epsilon_spent = (
            round, epsilon_next, budget, epsilon_spent)


@dataclass(frozen=True)
class DPConfig:
    """``dp`` of the aggregator config. Either ``noise_multiplier`` (z) or ``target_epsilon``
    (z is then solved with the accountant for ``rounds`` rounds at ``sampling_rate``)."""

    clip: float
    mode: str = "central"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int | None = None  # for target_epsilon (default: the federation's rounds)
    sampling_rate: float | None = None  # q for target_epsilon (default: the selection fraction)
    delta: float = 1e-5
    epsilon_budget: float | None = None
    expected_clients: int | None = None  # the fixed denominator (default: clients selected)
    accountant: str = "rdp"
    seed: int | None = None  # tests only: production noise is seeded from os.urandom
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def parse(cls, data: Mapping[str, Any], *, fraction: float = 1.0, rounds: int = 1) -> DPConfig:
        if not isinstance(data, Mapping):
            raise DPConfigError(f"dp must be an object, got {data!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        unknown = set(data) - known
        if unknown:
            raise DPConfigError(f"dp: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
        try:
            cfg = cls(**dict(data))
        except TypeError as exc:
            raise DPConfigError(f"dp: {exc}") from None
        cfg._check()
        if cfg.noise_multiplier is None:
            q = cfg.sampling_rate if cfg.sampling_rate is not None else fraction
            n = cfg.rounds or rounds
            z = calibrate_noise(cfg.target_epsilon, cfg.delta, q, n, mode=cfg.mode, accountant=cfg.accountant)
            cfg = cls(**{**{k: v for k, v in asdict(cfg).items() if k != "extra"}, "noise_multiplier": z,
                         "sampling_rate": q, "rounds": n})
        return cfg

    def _check(self) -> None:
        def positive(name, v, kind=(int, float)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) or v <= 0):
                raise DPConfigError(f"dp: {name} must be a positive number, got {v!r}")

        if self.mode not in MODES:
            raise DPConfigError(f"dp: mode must be one of {MODES}, got {self.mode!r}")
        if self.accountant not in ACCOUNTANTS:
            raise DPConfigError(f"dp: accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.clip is None:
            raise DPConfigError("dp: clip (the L2 bound C of a client's delta) is required")
        for name in ("clip", "noise_multiplier", "target_epsilon", "epsilon_budget"):
            positive(name, getattr(self, name))
        for name in ("rounds", "expected_clients"):
            positive(name, getattr(self, name), int)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise DPConfigError("dp: give exactly one of noise_multiplier and target_epsilon")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise DPConfigError(f"dp: delta must be in (0, 1), got {self.delta!r}")
        if self.sampling_rate is not None and not 0 < self.sampling_rate <= 1:
            raise DPConfigError(f"dp: sampling_rate must be in (0, 1], got {self.sampling_rate!r}")

    def task_config(self) -> dict:
        """What a client's half needs (``Task.config["dp"]``): clip before upload, and in local
        mode add its own noise."""
        out: dict[str, Any] = {"mode": self.mode, "clip": self.clip}
        if self.mode == "local":
            out["noise_multiplier"] = self.noise_multiplier
        if self.seed is not None:
            out["seed"] = self.seed
        return out


# -- accounting ------------------------------------------------------------------------------

def round_event(mode: str, q: float, z: float):
    """The DpEvent of one released round (see the module docstring)."""
    import dp_accounting as dpa

    if mode == "local":
        return dpa.GaussianDpEvent(z / 2.0)
    gauss = dpa.GaussianDpEvent(z)
    return gauss if q >= 1.0 else dpa.PoissonSampledDpEvent(q, gauss)


def _accountant(kind: str):
    import dp_accounting as dpa

    if kind == "pld":
        return dpa.pld.PLDAccountant()
    return dpa.rdp.RdpAccountant(list(RDP_ORDERS))


def epsilon(rounds: Iterable[tuple[float, float]], delta: float, *, mode: str = "central",
            accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` after the released rounds, each given as (q, z)."""
    import dp_accounting as dpa

    counts = Counter((round(float(q), 12), float(z)) for q, z in rounds)
    if not counts:
        return 0.0
    events = [dpa.SelfComposedDpEvent(round_event(mode, q, z), n) for (q, z), n in sorted(counts.items())]
    acc = _accountant(accountant)
    acc.compose(events[0] if len(events) == 1 else dpa.ComposedDpEvent(events))
    return float(acc.get_epsilon(delta))


@lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, q: float, rounds: int, *, mode: str = "central",
                    accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose epsilon after ``rounds`` rounds is <= the target
    (the library's calibration, a bracketed search over z)."""
    import dp_accounting as dpa

    def event(z: float):
        return dpa.SelfComposedDpEvent(round_event(mode, q, z), rounds)

    return float(dpa.calibrate_dp_mechanism(lambda: _accountant(accountant), event, target_epsilon, delta,
                                            bracket_interval=dpa.ExplicitBracketInterval(0.05, 500.0),
                                            tol=1e-4))


# -- clipping and noise ------------------------------------------------------------------------

def delta_norm(tensors: Mapping[str, np.ndarray], spec: UpdateSpec) -> float:
    sq = 0.0
    for name in spec.names:
        d = to_float64(tensors[name], spec.tensors[name].dtype) - spec.reference64(name)
        sq += float(np.dot(d.ravel(), d.ravel()))
    return math.sqrt(sq)


def clip_update(update: Mapping[str, np.ndarray], spec: UpdateSpec, clip: float, *, client: str | None = None,
                max_norm: float | None = None, over_norm_clip: bool = False) -> ValidatedUpdate:
    """Validate (names, dtypes, shapes, finiteness, the optional ``max_norm`` sanity bound), then
    clip the delta to the reference to L2 norm <= ``clip`` *as folded*: the norm is measured
    again after re-encoding to the wire dtype and the scale shrunk until it holds, so the
    sensitivity bound is exact for the values the aggregate sees."""
    checked = validate_update(update, spec, max_norm=max_norm, clip=over_norm_clip, client=client)
    norm = delta_norm(checked.tensors, spec) if checked.clipped else checked.norm
    if norm <= clip:
        return ValidatedUpdate(checked.tensors, checked.norm, checked.clipped)
    deltas = {n: to_float64(checked.tensors[n], spec.tensors[n].dtype) - spec.reference64(n) for n in spec.names}
    scale = clip / norm
    for attempt in range(8):  # rounding to the wire dtype may land just outside: shrink a little
        out = {n: encode(spec.reference64(n) + deltas[n] * scale, spec.tensors[n].dtype) for n in spec.names}
        got = delta_norm(out, spec)
        if got <= clip:
            for a in out.values():
                a.flags.writeable = False
            return ValidatedUpdate(out, checked.norm, True)
        scale *= clip / got * (1.0 - 1e-7 * 10**attempt)
    raise InvalidUpdate("norm", f"delta of norm {norm:.6g} cannot be clipped to {clip:.6g} within the wire "
                                "dtype's precision", client=client)


def noisy_mean(mean: Mapping[str, np.ndarray], count: int, spec: UpdateSpec, *, clip: float, z: float,
               denominator: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Central DP release: ``reference + (sum of clipped deltas + N(0, (z C)^2)) / denominator``.
    ``mean`` is the unweighted float64 mean of the ``count`` clipped updates (full states)."""
    out = {}
    for name in spec.names:
        ref = spec.reference64(name)
        total = (np.asarray(mean[name], dtype=np.float64) - ref) * count
        if z > 0:  # z 0: the noise is already in the sum (distributed DP under secure aggregation)
            total += rng.normal(0.0, z * clip, size=total.shape)
        out[name] = ref + total / denominator
    return out


# -- the server's side -----------------------------------------------------------------------

class ServerDP:
    """What the service (and the simulator) do with a ``dp`` config: validate updates (clip,
    unit weight), release a round's aggregate (noise, fixed denominator), account and enforce
    the budget."""

    def __init__(self, cfg: DPConfig):
        self.cfg = cfg
        self._round_salt = 0

    @classmethod
    def build(cls, data: Mapping[str, Any] | None, *, algorithm: str, rule: str, fraction: float = 1.0,
              rounds: int = 1, mode: str = "sync") -> ServerDP | None:
        if not data:
            return None
        if algorithm not in AVERAGED or rule == "collect":
            raise DPConfigError(f"dp applies to the averaged algorithms {AVERAGED}; {algorithm!r} collects its "
                                "clients' updates (logits), which this DP mechanism does not cover")
        if rule != "fedavg":
            raise DPConfigError(f"dp needs aggregation 'fedavg' (the clipped sum), not {rule!r}")
        if DPConfig.parse(data, fraction=fraction, rounds=rounds).mode == "local" and algorithm == "fedbiot":
            raise DPConfigError("local dp needs the client half to add its noise; fedbiot's client does not")
        if mode != "sync":
            raise DPConfigError("dp is implemented for synchronous rounds only (mode 'sync')")
        return cls(DPConfig.parse(data, fraction=fraction, rounds=rounds))

    # intake
    def check(self, tensors: Mapping[str, np.ndarray], spec: UpdateSpec, client: str, *,
              max_norm: float | None = None, clip: bool = False) -> tuple[ValidatedUpdate, float]:
        """A validated update and its weight (1: the unweighted mean)."""
        if self.cfg.mode == "local":  # already clipped and noised by the client: not clipped again
            return validate_update(tensors, spec, max_norm=max_norm, clip=clip, client=client), 1.0
        return clip_update(tensors, spec, self.cfg.clip, client=client, max_norm=max_norm,
                           over_norm_clip=clip), 1.0

    # release
    def release(self, mean: Mapping[str, np.ndarray], count: int, spec: UpdateSpec, *, selected: int,
                round: int, q: float, spent: list[tuple[float, float]],
                noised_by_clients: bool = False) -> tuple[dict, dict]:
        """The round's aggregate and its metrics (``dp_epsilon``: the running total).
        ``noised_by_clients``: central mode under secure aggregation, where each client added its
        share of the noise (aggregator/secure_round.py); only the fixed denominator applies here."""
        cfg = self.cfg
        z = float(cfg.noise_multiplier)
        if cfg.mode == "central":
            denominator = cfg.expected_clients or selected
            rng = noise_rng(cfg.seed, round)
            agg = noisy_mean(mean, count, spec, clip=cfg.clip, z=0.0 if noised_by_clients else z,
                             denominator=denominator, rng=rng)
        else:
            denominator, agg = count, dict(mean)
        history = [*spent, (q, z)]
        eps = epsilon(history, cfg.delta, mode=cfg.mode, accountant=cfg.accountant)
        return agg, {"dp_epsilon": eps, "dp": {"mode": cfg.mode, "q": q, "noise_multiplier": z, "clip": cfg.clip,
                                               "delta": cfg.delta, "denominator": denominator,
                                               "rounds_released": len(history),
                                               **({"noise": "distributed"} if noised_by_clients else {})}}

    def check_budget(self, round: int, q: float, spent: list[tuple[float, float]]) -> float:
        """Epsilon after the next round; :class:`PrivacyBudgetExhausted` when over the budget."""
        cfg = self.cfg
        nxt = epsilon([*spent, (q, float(cfg.noise_multiplier))], cfg.delta, mode=cfg.mode,
                      accountant=cfg.accountant)
        if cfg.epsilon_budget is not None and nxt > cfg.epsilon_budget:
            raise PrivacyBudgetExhausted(round, nxt, cfg.epsilon_budget,
                                         epsilon(spent, cfg.delta, mode=cfg.mode, accountant=cfg.accountant))
        return nxt


def spent_rounds(metrics_of: Callable[[int], Mapping[str, Any]], last_round: int) -> list[tuple[float, float]]:
    """(q, z) of every released round 1..last_round, read from the rounds' committed metrics."""
    out = []
    for r in range(1, last_round + 1):
        d = (metrics_of(r) or {}).get("dp")
        if isinstance(d, Mapping) and "q" in d:
            out.append((float(d["q"]), float(d["noise_multiplier"])))
    return out
