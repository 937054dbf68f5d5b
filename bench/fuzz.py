"""Long fuzz runs of the wire parsers (the targets of ``tests/fuzz/targets.py``).

    python bench/fuzz.py --target envelope --seconds 3600
    python bench/fuzz.py --target all --seconds 300 --update-corpus

With atheris installed (``pip install -e ".[fuzz]"``) each target runs under libFuzzer with
coverage feedback, starting from ``tests/fuzz/corpus/<target>/``; ``--update-corpus`` merges
the inputs that found new coverage back into that folder (libFuzzer ``-merge=1``, so only
inputs that add coverage are kept). Without atheris (or with ``--engine hypothesis``) the
target runs under hypothesis for the same time, on random bytes and on mutations of the corpus.

Per target one line ``BENCH fuzz {...}`` (JSON: target, engine, seconds, executions, exec/s,
crashes, corpus size); crashing inputs go to ``--artifacts`` (default: a temporary folder,
printed). Exit status 1 when any target crashed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ_DIR = ROOT / "tests" / "fuzz"
CORPUS = FUZZ_DIR / "corpus"
NAMES = ["envelope", "codec", "chunks", "tensors", "arrays", "http"]
INSTRUMENT = ["bridge", "aggregator", "algorithms", "targets"]


def _paths() -> None:
    for p in (str(ROOT), str(FUZZ_DIR)):
        if p not in sys.path:
            sys.path.insert(0, p)


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


# -- atheris (libFuzzer) --------------------------------------------------------------------


def _child(target: str, libfuzzer_args: list[str]) -> None:
    """Runs in a subprocess: atheris.Fuzz() never returns."""
    import atheris

    _paths()
    logging.disable(logging.WARNING)  # the codec's "unknown field" warnings would flood the log
    with atheris.instrument_imports(include=INSTRUMENT):
        import targets

        if target == "http":  # imported lazily by the target: load it while instrumenting
            targets._http()
    # argv[0] must run this target again: libFuzzer's -merge re-executes it in subprocesses
    argv0 = os.environ.get("COTUNE_FUZZ_ARGV0", sys.argv[0])
    atheris.Setup([argv0, *libfuzzer_args], targets.TARGETS[target])
    atheris.Fuzz()


def _libfuzzer(target: str, args: list[str], log_path: Path, timeout: float) -> tuple[int, str]:
    wrapper = log_path.with_suffix(".sh")  # an executable that re-enters the target (for -merge)
    me = Path(__file__).resolve()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{me}" --child {target} -- "$@"\n')
    wrapper.chmod(0o755)
    cmd = [str(wrapper), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(FUZZ_DIR)]))
    env["COTUNE_FUZZ_ARGV0"] = str(wrapper)
    with open(log_path, "w") as log:
        try:
            rc = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    return rc, log_path.read_text(errors="replace")


def run_atheris(
    target: str, seconds: int, artifacts: Path, update_corpus: bool, max_len: int
) -> dict:
    seeds = CORPUS / target
    seeds.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    common = [
        "-rss_limit_mb=2048",
        "-timeout=10",
        f"-max_len={max_len}",
        f"-artifact_prefix={artifacts}/{target}-",
    ]
    started = time.time()
    rc, out = _libfuzzer(
        target,
        [*common, f"-max_total_time={seconds}", "-print_final_stats=1", str(work), str(seeds)],
        work.parent / f"fuzz-{target}.log",
        timeout=seconds + 300,
    )
    elapsed = time.time() - started
    m = re.search(r"stat::number_of_executed_units:\s*(\d+)", out)
    execs = int(m.group(1)) if m else 0
    if not m:  # a crash ends the run before the final stats; the last status line has the count
        lines = re.findall(r"^#(\d+)\s", out, re.M)
        execs = int(lines[-1]) if lines else 0
    crashed = rc != 0 or "Uncaught Python exception" in out or "==ERROR" in out
    new_units = len(list(work.iterdir()))
    merged = merge(target, [work], artifacts, max_len) if update_corpus and new_units else 0
    cov = re.findall(r"cov: (\d+) ft: (\d+)", out)
    result = {
        "target": target,
        "engine": "atheris",
        "seconds": round(elapsed, 1),
        "executions": execs,
        "exec_per_s": round(execs / elapsed, 1) if elapsed else 0.0,
        "crashes": int(crashed),
        "coverage": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "new_units": new_units,
        "merged_into_corpus": merged,
        "corpus_files": len(list(seeds.iterdir())),
    }
    if crashed:
        tail = "\n".join(out.splitlines()[-40:])
        print(f"--- {target} crashed (rc {rc}); log tail:\n{tail}", file=sys.stderr)
    return result


def merge(target: str, dirs: list[Path], artifacts: Path, max_len: int) -> int:
    """Add to the corpus of ``target`` the inputs of ``dirs`` that bring new coverage."""
    seeds = CORPUS / target
    before = len(list(seeds.iterdir()))
    args = [
        f"-max_len={max_len}",
        f"-artifact_prefix={artifacts}/{target}-",
        "-merge=1",
        str(seeds),
    ]
    log = Path(tempfile.mkdtemp(prefix=f"fuzz-merge-{target}-")) / "merge.log"
    _libfuzzer(target, [*args, *map(str, dirs)], log, timeout=1800)
    return len(list(seeds.iterdir())) - before


# -- hypothesis fallback ---------------------------------------------------------------------


def run_hypothesis(target: str, seconds: int, artifacts: Path) -> dict:
    _paths()
    import targets
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    logging.disable(logging.WARNING)
    fn = targets.TARGETS[target]
    corpus = [p.read_bytes() for p in targets.corpus_files(target)] or [b""]

    @st.composite
    def mutated(draw) -> bytes:
        data = bytearray(draw(st.sampled_from(corpus)))
        for _ in range(draw(st.integers(0, 8))):
            op = draw(st.integers(0, 3))
            pos = draw(st.integers(0, max(0, len(data) - 1)))
            if op == 0 and data:
                data[pos] ^= 1 << draw(st.integers(0, 7))
            elif op == 1 and data:
                data[pos] = draw(st.integers(0, 255))
            elif op == 2:
                data[pos:pos] = draw(st.binary(max_size=8))
            else:
                del data[pos : pos + draw(st.integers(1, 16))]
        return bytes(data)

    executions, crashes = 0, 0
    deadline = time.time() + seconds
    started = time.time()

    def one(data: bytes) -> None:
        nonlocal executions
        executions += 1
        if time.time() > deadline:
            return
        fn(data)

    rng = random.Random(0)
    while time.time() < deadline:
        test = settings(
            max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )(given(st.binary(max_size=4096) | mutated())(one))
        try:
            hseed(rng.getrandbits(64))(test)()
        except Exception as exc:  # noqa: BLE001 (a crash: recorded, then the run goes on)
            crashes += 1
            path = artifacts / f"{target}-hypothesis-{crashes}.txt"
            path.write_text(f"{type(exc).__name__}: {exc}\n")
            print(f"--- {target}: {type(exc).__name__}: {exc} (details in {path})", file=sys.stderr)
    elapsed = time.time() - started
    return {
        "target": target,
        "engine": "hypothesis",
        "seconds": round(elapsed, 1),
        "executions": executions,
        "exec_per_s": round(executions / elapsed, 1) if elapsed else 0.0,
        "crashes": crashes,
        "corpus_files": len(corpus),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--target", default="all", choices=["all", *NAMES])
    ap.add_argument("--seconds", type=int, default=60, help="per target")
    ap.add_argument("--engine", default="auto", choices=["auto", "atheris", "hypothesis"])
    ap.add_argument(
        "--update-corpus",
        action="store_true",
        help="merge coverage-increasing inputs into tests/fuzz/corpus/<target>/ (atheris)",
    )
    ap.add_argument(
        "--write-seeds", action="store_true", help="(re)write the seed inputs into the corpus first"
    )
    ap.add_argument("--max-len", type=int, default=16384, help="largest input libFuzzer makes")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="only merge these folders into the corpus of --target",
    )
    ap.add_argument(
        "--artifacts", default=None, help="where crashing inputs go (default: a temporary folder)"
    )
    args = ap.parse_args(argv)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if have_atheris() else "hypothesis"
    if args.write_seeds:
        _paths()
        import targets

        print(f"wrote {targets.write_seeds()} seed inputs")
    artifacts = Path(args.artifacts or tempfile.mkdtemp(prefix="fuzz-artifacts-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    if args.merge:
        n = merge(args.target, [Path(d) for d in args.merge], artifacts, args.max_len)
        print(f"merged {n} inputs into {CORPUS / args.target}")
        return 0
    print(f"engine {engine}; crashing inputs go to {artifacts}", file=sys.stderr)
    failed = False
    for target in NAMES if args.target == "all" else [args.target]:
        if engine == "atheris":
            result = run_atheris(target, args.seconds, artifacts, args.update_corpus, args.max_len)
        else:
            result = run_hypothesis(target, args.seconds, artifacts)
        failed |= bool(result["crashes"])
        print("BENCH fuzz " + json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
