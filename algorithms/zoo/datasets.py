"""Real text bundled with the project: general text and non-IID client domains.

- General text, two sources: the King James Bible (public domain; one sample per chapter,
  verse numbers stripped) and modern English from fourteen fortune categories that are not
  client domains (one sample per fortune; anything also found in a domain was removed).
  Splits ``"train"`` (pretraining), ``"dev"`` and ``"test"`` (held out): every 20th chapter
  each for the Bible, 5 % each by content hash for the fortunes.
- Domains: eight fortune(6) categories (see ``data/SOURCES.md``); each fortune is one sample.
  Every domain has FIXED splits, assigned by a content hash so they never depend on file
  order or a random seed: ``"test"`` 10 %, ``"dev"`` 10 %, and of the rest one fifth
  ``"public"`` (the in-distribution slice the papers hold out as public/auxiliary data) and
  four fifths ``"private"``, which callers deal out to clients with :func:`client_shards`.

Everything is read from gzipped UTF-8 files next to this module; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import random
from functools import cache, lru_cache
from pathlib import Path

__all__ = [
    "DATA_DIR",
    "DOMAIN_SPLITS",
    "GENERAL_SPLITS",
    "DatasetError",
    "client_shards",
    "data_hashes",
    "domain_split",
    "domain_texts",
    "domains",
    "general_text",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
GENERAL_FILE = "kjv.txt.gz"
GENERAL_FORTUNES_FILE = "general-fortunes.txt.gz"
GENERAL_SOURCES = ("all", "kjv", "fortunes")
DOMAIN_PREFIX = "fortunes-"
DOMAIN_SUFFIX = ".txt.gz"
FORTUNE_SEPARATOR = "\n%\n"

GENERAL_SPLITS = ("train", "dev", "test")
DOMAIN_SPLITS = ("private", "public", "dev", "test")
TEST_FRACTION = 0.10
DEV_FRACTION = 0.10
PUBLIC_FRACTION_OF_TRAIN = 0.20  # one public part to four private parts, as in the papers
GENERAL_HELD_OUT_FRACTION = 0.05
_GENERAL_PERIOD = 20  # chapter i is test when i % 20 == 3, dev when i % 20 == 13


class DatasetError(ValueError):
    """An unknown split or domain, or a bundled data file that is missing."""


def _read(name: str) -> str:
    path = DATA_DIR / name
    if not path.is_file():
        raise DatasetError(f"bundled data file {path} is missing; reinstall cotune")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


@lru_cache(maxsize=1)
def _chapters() -> tuple[tuple[str, str], ...]:
    rows = []
    for line in _read(GENERAL_FILE).splitlines():
        name, _, text = line.partition("\t")
        rows.append((name, text))
    return tuple(rows)


def general_text(split: str = "train", source: str = "all") -> list[str]:
    """General text of ``split`` ("train", "dev" or "test").

    ``source`` "kjv" gives Bible chapters in canonical order, "fortunes" the modern samples
    in file order, "all" (default) the chapters followed by the fortunes.
    """
    if split not in GENERAL_SPLITS:
        raise DatasetError(f"unknown general split {split!r}; choose one of {GENERAL_SPLITS}")
    if source not in GENERAL_SOURCES:
        raise DatasetError(f"unknown general source {source!r}; choose one of {GENERAL_SOURCES}")
    out: list[str] = []
    if source in ("all", "kjv"):
        for i, (_, text) in enumerate(_chapters()):
            phase = i % _GENERAL_PERIOD
            which = "test" if phase == 3 else "dev" if phase == 13 else "train"
            if which == split:
                out.append(text)
    if source in ("all", "fortunes"):
        out.extend(_general_fortunes()[split])
    return out


@cache
def _general_fortunes() -> dict[str, tuple[str, ...]]:
    raw = _read(GENERAL_FORTUNES_FILE)
    texts = tuple(t for t in raw.rstrip("\n").split(FORTUNE_SEPARATOR) if t.strip())
    parts = _hash_split(
        "general", texts, {"test": GENERAL_HELD_OUT_FRACTION, "dev": GENERAL_HELD_OUT_FRACTION}
    )
    return {"train": parts["rest"], "dev": parts["dev"], "test": parts["test"]}


def _hash_split(
    salt: str, texts: tuple[str, ...], fractions: dict[str, float]
) -> dict[str, tuple[str, ...]]:
    """Exact-size parts of ``texts`` (file order kept inside each), chosen by content hash;
    what the fractions leave over is ``"rest"``. Independent of order and of any seed."""
    n = len(texts)
    ranked = sorted(
        range(n), key=lambda i: hashlib.sha256(f"{salt}\x00{texts[i]}".encode()).hexdigest()
    )
    parts, start = {}, 0
    for name, fraction in fractions.items():
        size = round(n * fraction)
        parts[name] = ranked[start : start + size]
        start += size
    parts["rest"] = ranked[start:]
    return {name: tuple(texts[i] for i in sorted(idx)) for name, idx in parts.items()}


@lru_cache(maxsize=1)
def _domain_names() -> tuple[str, ...]:
    names = [
        p.name[len(DOMAIN_PREFIX) : -len(DOMAIN_SUFFIX)]
        for p in DATA_DIR.glob(f"{DOMAIN_PREFIX}*{DOMAIN_SUFFIX}")
    ]
    return tuple(sorted(names))


def domains() -> list[str]:
    """Names of the bundled client domains, sorted."""
    return list(_domain_names())


def _check_domain(domain: str) -> None:
    if domain not in _domain_names():
        raise DatasetError(f"unknown domain {domain!r}; choose one of {domains()}")


@cache
def _domain_all(domain: str) -> tuple[str, ...]:
    _check_domain(domain)
    raw = _read(f"{DOMAIN_PREFIX}{domain}{DOMAIN_SUFFIX}")
    return tuple(t for t in raw.rstrip("\n").split(FORTUNE_SEPARATOR) if t.strip())


def domain_texts(domain: str) -> list[str]:
    """Every sample of ``domain`` in file order (all splits together)."""
    return list(_domain_all(domain))


@cache
def _domain_assignment(domain: str) -> dict[str, tuple[str, ...]]:
    texts = _domain_all(domain)
    n = len(texts)
    public = round(
        (n - round(n * TEST_FRACTION) - round(n * DEV_FRACTION)) * PUBLIC_FRACTION_OF_TRAIN
    )
    parts = _hash_split(
        domain,
        texts,
        {"test": TEST_FRACTION, "dev": DEV_FRACTION, "public": public / n if n else 0.0},
    )
    return {
        "test": parts["test"],
        "dev": parts["dev"],
        "public": parts["public"],
        "private": parts["rest"],
    }


def domain_split(domain: str, split: str) -> list[str]:
    """Samples of ``domain`` in the fixed ``split`` ("private", "public", "dev", "test")."""
    if split not in DOMAIN_SPLITS:
        raise DatasetError(f"unknown domain split {split!r}; choose one of {DOMAIN_SPLITS}")
    return list(_domain_assignment(domain)[split])


def client_shards(domain: str, n_clients: int, seed: int = 0) -> list[list[str]]:
    """Deal the private split of ``domain`` into ``n_clients`` disjoint shards.

    The private samples are shuffled with ``random.Random(seed)`` and cut into contiguous
    shards whose sizes differ by at most one; the same (domain, n_clients, seed) always gives
    the same shards.
    """
    if n_clients < 1:
        raise DatasetError(f"n_clients must be at least 1, got {n_clients}")
    private = domain_split(domain, "private")
    if n_clients > len(private):
        raise DatasetError(
            f"domain {domain!r} has only {len(private)} private samples for {n_clients} clients"
        )
    random.Random(seed).shuffle(private)
    base, extra = divmod(len(private), n_clients)
    shards, start = [], 0
    for k in range(n_clients):
        size = base + (1 if k < extra else 0)
        shards.append(private[start : start + size])
        start += size
    return shards


def data_hashes() -> dict[str, str]:
    """SHA-256 of every bundled data file, by file name (used as a cache key)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(DATA_DIR.glob("*.txt.gz"))
    }
