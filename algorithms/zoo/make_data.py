"""Regenerate the bundled text in ``algorithms/zoo/data/`` (maintainers only).

Needs the Debian packages ``fortunes`` and ``bible-kjv`` (``apt-get install fortunes
bible-kjv``); users never run this, the gzipped output is committed. The output is
byte-for-byte reproducible (gzip with mtime 0, no file name).

    python -m algorithms.zoo.make_data
"""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import sys
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
FORTUNE_DIR = Path("/usr/share/games/fortunes")
# Eight categories with clearly different register: technical, recipes/food jokes, legal,
# literary quotations, political quips, science, verse and sports.
DOMAINS = (
    "computers",
    "food",
    "law",
    "literature",
    "politics",
    "science",
    "songs-poems",
    "sports",
)
# Modern English for the general corpus, from categories that are NOT domains and do not
# lean on a domain's topic (no "cookie", "linux", "perl": they are mostly computing).
GENERAL_FORTUNES = (
    "art",
    "definitions",
    "education",
    "fortunes",
    "humorists",
    "kids",
    "love",
    "medicine",
    "miscellaneous",
    "people",
    "platitudes",
    "riddles",
    "wisdom",
    "work",
)
FORTUNE_SEPARATOR = "\n%\n"
_OVERSTRIKE = re.compile(".\b")  # "_\bx" underlines and "x\bx" bolds in old fortune files
_CHAPTER = re.compile(r"^(?P<book>(?:[1-3] )?[A-Z][A-Za-z ]+?) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s*\d+ (?P<text>.*\S)\s*$")


def write_gzip(path: Path, text: str) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def clean_fortune(raw: str) -> str:
    text = _OVERSTRIKE.sub("", raw).replace("\a", "").replace("\b", "")
    if any(0x80 <= ord(c) < 0x100 for c in text):
        try:  # a few fortunes are UTF-8 that was decoded as Latin-1 once too often
            text = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def read_fortunes(domain: str) -> list[str]:
    raw = (FORTUNE_DIR / domain).read_text(encoding="utf-8")
    seen: set[str] = set()
    out = []
    for chunk in raw.split("\n%\n"):
        text = clean_fortune(chunk.removesuffix("\n%").removesuffix("%"))
        if text.strip() and text not in seen:  # duplicates would leak across splits
            seen.add(text)
            out.append(text)
    return out


def read_kjv() -> list[tuple[str, str]]:
    """(``"Genesis 1"``, chapter text without verse numbers), in canonical order."""
    proc = subprocess.run(
        ["bible", "-l100000", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    )
    chapters: list[tuple[str, list[str]]] = []
    for line in proc.stdout.split("\n"):
        if not line.strip():
            continue
        head = _CHAPTER.match(line)
        if head:
            chapters.append((f"{head['book']} {head['chapter']}", []))
            continue
        verse = _VERSE.match(line)
        if not verse or not chapters:
            raise ValueError(f"unexpected line from bible(1): {line[:80]!r}")
        chapters[-1][1].append(verse["text"])
    return [(name, " ".join(verses)) for name, verses in chapters]


def _normal(text: str) -> str:
    return " ".join(text.split()).lower()


def general_fortunes(domain_texts: set[str]) -> list[str]:
    """Fortunes of GENERAL_FORTUNES that appear in no domain (whitespace/case-insensitive)."""
    seen = set(domain_texts)
    out = []
    for category in GENERAL_FORTUNES:
        for text in read_fortunes(category):
            key = _normal(text)
            if key not in seen:
                seen.add(key)
                out.append(text)
    return out


def main() -> int:
    DATA_DIR.mkdir(exist_ok=True)
    chapters = read_kjv()
    write_gzip(DATA_DIR / "kjv.txt.gz", "".join(f"{n}\t{t}\n" for n, t in chapters))
    print(f"kjv: {len(chapters)} chapters")
    domain_keys: set[str] = set()
    for domain in DOMAINS:
        fortunes = read_fortunes(domain)
        domain_keys.update(_normal(t) for t in fortunes)
        write_gzip(DATA_DIR / f"fortunes-{domain}.txt.gz", FORTUNE_SEPARATOR.join(fortunes) + "\n")
        print(f"{domain}: {len(fortunes)} fortunes")
    general = general_fortunes(domain_keys)
    write_gzip(DATA_DIR / "general-fortunes.txt.gz", FORTUNE_SEPARATOR.join(general) + "\n")
    print(f"general fortunes: {len(general)} from {len(GENERAL_FORTUNES)} categories")
    return 0


if __name__ == "__main__":
    sys.exit(main())
