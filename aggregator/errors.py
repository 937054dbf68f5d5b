"""Typed errors of the aggregator core. Everything raised on purpose by :mod:`aggregator`
derives from :class:`AggregatorError`, so the service loop can catch one class, count the
``code``/``reason`` and keep running instead of crashing on a bad update."""

from __future__ import annotations


class AggregatorError(Exception):
    """Base of every error raised by :mod:`aggregator`."""

    #: short stable name used in counters, logs and typed error messages on the wire
    code = "aggregator_error"


class InvalidUpdate(AggregatorError):
    """A client update that must not be folded into the aggregate.

    ``reason`` is machine-readable (one of :attr:`REASONS`) so it can be stored in the
    participants table and sent back to the client as a typed rejection; ``str(err)`` is the
    human explanation.
    """

    code = "invalid_update"

    #: stable reason codes; add new ones at the end, never rename (they are persisted)
    REASONS = frozenset(
        {
            "shape",  # a tensor has the wrong shape
            "names",  # tensor names differ from the spec (missing or unexpected)
            "dtype",  # not a numpy array, or not the declared dtype
            "non_finite",  # NaN or Inf somewhere
            "norm",  # update delta above the norm bound (and clipping is off)
            "round",  # update for a round that is not the open one
            "duplicate",  # the client already contributed to this round
            "late",  # arrived after the round's deadline or after it was sealed
            "unknown_client",  # sender not in the federation
            "not_selected",  # known client, but not selected for this round
            "weight",  # sample weight / num_examples not a finite positive number
            "payload",  # an algorithm's own check of a collected payload failed (see its message)
            "vocabulary",  # a payload from a tokenizer the aggregator does not know
            "transport",  # the update's blob did not arrive complete and intact in time
            "stale",  # (buffered rounds) trained on a global version older than max_staleness
        }
    )

    def __init__(self, reason: str, message: str, *, client: str | None = None) -> None:
        if reason not in self.REASONS:
            raise ValueError(
                f"unknown InvalidUpdate reason {reason!r}; use one of {sorted(self.REASONS)}"
            )
        self.reason = reason
        self.client = client
        prefix = (
            f"update from {client!r} rejected ({reason})"
            if client
            else f"update rejected ({reason})"
        )
        super().__init__(f"{prefix}: {message}")


class SpecError(AggregatorError, ValueError):
    """A global state or aggregator configuration that cannot define valid updates (a dtype
    that is neither float16/float32 nor declared as bfloat16, an unknown strategy name, a bad
    trim fraction)."""

    code = "spec"


class StateError(AggregatorError):
    """The persistent state (SQLite store, checkpoint files, spill files) is missing,
    inconsistent, or asked to make a transition it does not allow (accepting into a committed
    round, opening a round while one is open)."""

    code = "state"


class SchemaVersionError(StateError):
    """The state database was written by a schema version this build does not read."""

    code = "schema_version"


class CheckpointCorrupt(StateError):
    """A checkpoint or spill file whose content does not hash to its name, or that does not
    parse as a cotune safetensors checkpoint."""

    code = "checkpoint_corrupt"
