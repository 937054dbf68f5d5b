"""Build (or find in the cache) the project's own tiny pretrained LMs.

``build_zoo()`` trains two tokenizers and three causal LMs from the bundled text and saves
them as ordinary Hugging Face checkpoints (``config.json`` + ``model.safetensors`` +
tokenizer files), so they load through ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` exactly like a user's own checkpoint:

- ``llm``: Llama-style, the cloud model, tokenizer T1 (byte-level BPE);
- ``slm-llama``: Llama-style, about 5x smaller, the SAME tokenizer T1 (FedCoLLM, FedPT);
- ``slm-gpt2``: GPT-2-style, about 5x smaller, its own tokenizer T2 (SentencePiece-like
  "▁" BPE with byte fallback, another vocabulary size) for FedMKT's token alignment.

The cache directory (``~/.cache/cotune/zoo``, or ``$COTUNE_ZOO``) holds one folder per
recipe-and-data hash with a ``manifest.json``; a build happens in a temporary folder that is
renamed into place only when complete, under a file lock so that concurrent callers build
once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .datasets import data_hashes
from .recipes import FULL, MODEL_NAMES, QUICK, ZooRecipe

try:  # POSIX only; without it concurrent builders merely duplicate work
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = ["ZooError", "ZooPaths", "build_zoo", "default_cache_dir", "models_digest", "recipe_key", "verify_zoo"]

MANIFEST = "manifest.json"


class ZooError(RuntimeError):
    """The zoo could not be built or its cache is unusable."""


@dataclass(frozen=True)
class ZooPaths:
    """Where a built zoo lives. ``paths["slm-gpt2"]`` works as well as ``paths.slm_gpt2``."""

    root: Path
    llm: Path
    slm_llama: Path
    slm_gpt2: Path
    manifest: dict = field(compare=False, hash=False, repr=False)

    def __getitem__(self, name: str) -> Path:
        if name not in MODEL_NAMES:
            raise KeyError(f"unknown zoo model {name!r}; choose one of {MODEL_NAMES}")
        return getattr(self, name.replace("-", "_"))

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def digest(self) -> str:
        """Hash of every checkpoint file's SHA-256 (the models themselves, not the recipe): two
        zoos with the same digest hold bitwise the same models. Quality figures carry it."""
        return models_digest(self.manifest)

    @property
    def name(self) -> str:
        """``<recipe>-<key>:<digest[:12]>``: what a benchmark line names its models with."""
        return f"{self.manifest['recipe']['name']}-{self.key}:{self.digest[:12]}"

    def load(self, name: str):
        """``(model, tokenizer)`` for ``name``, loaded the way any user checkpoint is."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(self[name])
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def default_cache_dir() -> Path:
    env = os.environ.get("COTUNE_ZOO")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/cotune/zoo").expanduser()


def recipe_key(recipe: ZooRecipe) -> str:
    """Hash of everything that determines the checkpoints: recipe and bundled data."""
    blob = json.dumps({"recipe": recipe.to_json(), "data": data_hashes()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_zoo(
    cache_dir: str | os.PathLike | None = None,
    quick: bool = False,
    progress: bool = True,
    recipe: ZooRecipe | None = None,
) -> ZooPaths:
    """Return the zoo for ``recipe`` (default: the full one, or the quick one), building it
    into ``cache_dir`` first unless a complete build with the same key is already there."""
    recipe = recipe or (QUICK if quick else FULL)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = recipe_key(recipe)
    root = cache / f"{recipe.name}-{key}"
    found = _cached(root, key)
    if found is not None:
        return found
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache / f".{recipe.name}-{key}.lock"):
        found = _cached(root, key)  # another process may have finished meanwhile
        if found is not None:
            return found
        if root.exists():  # incomplete or foreign content under our name: rebuild it
            shutil.rmtree(root)
        for stale in cache.glob(f".tmp-{recipe.name}-{key}-*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache / f".tmp-{recipe.name}-{key}-{os.getpid()}"
        tmp.mkdir()
        try:
            manifest = _build(tmp, recipe, key, _logger(progress), progress)
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    found = _cached(root, key)
    if found is None:  # pragma: no cover - would mean the rename did not take
        raise ZooError(f"zoo build finished but {root} does not hold a valid manifest")
    return found


def models_digest(manifest: dict) -> str:
    files = {name: manifest["models"][name]["files"] for name in MODEL_NAMES}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def verify_zoo(root: Path, manifest: dict) -> None:
    """Every checkpoint file hashes to what the build recorded; ZooError naming the first that
    does not (a corrupted or hand-edited zoo must not produce figures under its name)."""
    for name in MODEL_NAMES:
        for fname, digest in manifest["models"][name]["files"].items():
            path = root / name / fname
            if not path.is_file():
                raise ZooError(f"zoo {root}: {name}/{fname} is missing; delete {root} to rebuild")
            if _sha256(path) != digest:
                raise ZooError(f"zoo {root}: {name}/{fname} does not match the hash recorded at build time "
                               f"(corrupted or modified); delete {root} to rebuild")


def _cached(root: Path, key: str) -> ZooPaths | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("key") != key:
        return None
    paths = {name: root / name for name in MODEL_NAMES}
    for path in paths.values():
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            return None
    verify_zoo(root, manifest)
    return ZooPaths(
        root=root,
        llm=paths["llm"],
        slm_llama=paths["slm-llama"],
        slm_gpt2=paths["slm-gpt2"],
        manifest=manifest,
    )


@contextlib.contextmanager
def _lock(path: Path):
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _logger(progress: bool):
    start = time.time()

    def log(msg: str) -> None:
        if progress:
            print(f"[zoo {time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _build_environment(threads: int):
    import torch
    import transformers

    previous_threads = torch.get_num_threads()
    previous_verbosity = transformers.logging.get_verbosity()
    previous_bars = transformers.utils.logging.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        transformers.logging.set_verbosity(previous_verbosity)
        if previous_bars:
            transformers.utils.logging.enable_progress_bar()


def _schedule(recipe: ZooRecipe) -> list[list[str]]:
    """Models per lane, longest first onto the least loaded lane (cost ~ params x tokens)."""
    lanes: list[list[str]] = [[] for _ in range(max(1, recipe.lanes))]
    load = [0.0] * len(lanes)
    vocab = {t.name: t.vocab_size for t in recipe.tokenizers}

    def cost(spec) -> float:
        per_layer = 4 * spec.hidden**2 + 3 * spec.hidden * spec.intermediate
        return (spec.layers * per_layer + spec.hidden * vocab[spec.tokenizer]) * spec.train_tokens

    for spec in sorted(recipe.models, key=cost, reverse=True):
        lane = load.index(min(load))
        lanes[lane].append(spec.name)
        load[lane] += cost(spec)
    return [lane for lane in lanes if lane]


def kernel_env(recipe: ZooRecipe) -> dict[str, str]:
    """Environment that holds a worker to the recipe's kernel branch (empty: the host's own).
    Read by the libraries when they load, so it only works for a fresh process."""
    if recipe.reproducible is None:
        return {}
    return {
        "ATEN_CPU_CAPABILITY": "avx2",  # torch's own vectorised kernels (softmax, norms, AdamW)
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2" if recipe.reproducible == "avx2" else "COMPATIBLE",
        "MKL_DYNAMIC": "FALSE",  # MKL may otherwise use fewer threads than asked: other sums
        "OMP_DYNAMIC": "FALSE",
    }


def check_reproducible_host(recipe: ZooRecipe) -> None:
    """ZooError unless this CPU can run the recipe's pinned kernel branch."""
    if recipe.reproducible is None:
        return
    import platform

    import torch

    machine = platform.machine().lower()
    capability = torch.backends.cpu.get_cpu_capability()
    if machine not in ("x86_64", "amd64") or capability not in ("AVX2", "AVX512"):
        raise ZooError(f"a reproducible build ({recipe.reproducible!r}) runs the x86-64 AVX2 kernels; "
                       f"this CPU is {machine} with {capability}: build the recipe without "
                       "reproducible (its checkpoints are then this machine's own)")


def _run_lane(names: list[str], jobs: dict[str, dict], progress: bool,
              extra_env: dict[str, str] | None = None) -> None:
    """Train the models of one lane one after another, each in a fresh worker process."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(jobs[names[0]]["threads"])
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.update(extra_env or {})
    for name in names:
        job = jobs[name]
        proc = subprocess.Popen(
            [sys.executable, "-m", "algorithms.zoo.worker", job["job_file"]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        tail: list[str] = []
        assert proc.stderr is not None
        for line in proc.stderr:
            tail = (tail + [line.rstrip()])[-40:]
            if progress:
                print(line, end="", file=sys.stderr, flush=True)
        if proc.wait() != 0:
            detail = "\n".join(tail)
            raise ZooError(f"training {name} failed (exit {proc.returncode}):\n{detail}")


def _build(out: Path, recipe: ZooRecipe, key: str, log, progress: bool) -> dict:
    import tokenizers
    import torch
    import transformers

    from algorithms.core.tokenizer import save_tokenizer, train_tokenizer

    from .pretrain import token_stream
    from .worker import corpora, train_one

    t_start = time.perf_counter()
    t0 = time.time()
    texts = corpora(recipe)
    tok_info: dict[str, dict] = {}
    tok_root = out / "_tokenizers"
    for spec in recipe.tokenizers:
        t1 = time.perf_counter()
        tok = train_tokenizer(texts["tokenizer"], spec.vocab_size, spec.style)
        save_tokenizer(tok, tok_root / spec.name)
        n_tokens = len(token_stream(tok, texts["pretrain"]))
        tok_info[spec.name] = {
            "style": spec.style,
            "vocab_size": len(tok),
            "requested_vocab_size": spec.vocab_size,
            "pretrain_tokens_per_epoch": n_tokens,
            "chars_per_token": round(sum(map(len, texts["pretrain"])) / n_tokens, 3),
        }
        log(
            f"tokenizer {spec.name} ({spec.style}, {len(tok)} entries) in "
            f"{time.perf_counter() - t1:.1f}s: {n_tokens:,} pretraining tokens per epoch"
        )

    jobs_dir = out / "_jobs"
    jobs_dir.mkdir()
    jobs: dict[str, dict] = {}
    for spec in recipe.models:
        job = {
            "recipe": recipe.to_json(),
            "model": spec.name,
            "tokenizer_dir": str(tok_root / spec.tokenizer),
            "out": str(out / spec.name),
            "result": str(jobs_dir / f"{spec.name}.result.json"),
            "job_file": str(jobs_dir / f"{spec.name}.job.json"),
            "threads": recipe.threads_per_lane,
            "progress": progress,
            "t0": t0,
        }
        Path(job["job_file"]).write_text(json.dumps(job, indent=2))
        jobs[spec.name] = job

    lanes = _schedule(recipe)
    log(f"training in {len(lanes)} lane(s): " + " | ".join(", ".join(lane) for lane in lanes))
    check_reproducible_host(recipe)
    if len(lanes) == 1 and recipe.reproducible is None:  # in this process: no interpreter start-up
        with _build_environment(recipe.threads_per_lane):
            for name in lanes[0]:
                report = train_one(jobs[name])
                Path(jobs[name]["result"]).write_text(json.dumps(report))
    else:
        errors: list[BaseException] = []

        def run(lane: list[str]) -> None:
            try:
                _run_lane(lane, jobs, progress, kernel_env(recipe))
            except BaseException as exc:  # re-raised in the calling thread below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(lane,)) for lane in lanes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    models: dict[str, dict] = {}
    kernels: dict[str, dict] = {}
    for spec in recipe.models:
        report = json.loads(Path(jobs[spec.name]["result"]).read_text())
        kernels[spec.name] = report.pop("kernels", {})
        report["tokenizer_style"] = tok_info[spec.tokenizer]["style"]
        target = out / spec.name
        report["files"] = {p.name: _sha256(p) for p in sorted(target.iterdir()) if p.is_file()}
        models[spec.name] = report
    shutil.rmtree(tok_root)
    shutil.rmtree(jobs_dir)

    build_seconds = round(time.perf_counter() - t_start, 1)
    log(f"zoo {recipe.name}-{key} built in {build_seconds:.0f}s")
    return {
        "zoo_version": recipe.version,
        "key": key,
        "recipe": recipe.to_json(),
        "data": data_hashes(),
        "tokenizers": tok_info,
        "models": models,
        "lanes": lanes,
        # what each model trained on: the kernel branch, the environment that pinned it
        "kernels": {"reproducible": recipe.reproducible, "env": kernel_env(recipe), "by_model": kernels},
        "eval_texts": {
            "general_test_samples": len(texts["eval_general"]),
            "domains_test_samples": len(texts["eval_domains"]),
        },
        "build_seconds": build_seconds,
        "cpu_count": os.cpu_count(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
