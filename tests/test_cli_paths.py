"""User paths are resolved against the caller's working directory: ``cotune profile`` run from
another directory with relative ``--model`` / ``--data`` / ``--out`` (the README's own form),
whose job runs in a worker subprocess with a different working directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _profile(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``cotune profile --device generic-cpu --model models/slm ...`` run from ``cwd``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "cotune", "profile", "--device", "generic-cpu", "--model", "models/slm", *args]
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def test_profile_train_with_relative_paths_from_another_cwd(tiny_llama_path, tmp_path):
    work = tmp_path / "elsewhere"
    shutil.copytree(tiny_llama_path, work / "models" / "slm")
    (work / "data").mkdir()
    (work / "data" / "texts.txt").write_text(
        "\n".join(f"sample number {i} of a tiny private corpus" for i in range(8)) + "\n"
    )
    proc = _profile(work, "--threads", "1", "--data", "data/texts.txt", "--job", "train", "--steps", "1",
                    "--batch", "1", "--seq", "16", "--quant", "fp32", "--out", "prof")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((work / "prof" / "profile.json").read_text())
    assert rep["status"] == "ok" and rep["measured"]["steps"] == 1
    assert Path(rep["model"]["path"]) == (work / "models" / "slm").absolute()
    assert Path(rep["run"]["data"]) == (work / "data" / "texts.txt").absolute()


def test_profile_missing_relative_data_is_a_usage_error(tiny_llama_path, tmp_path):
    from edge_sdk.profiler import EXIT_USAGE

    shutil.copytree(tiny_llama_path, tmp_path / "models" / "slm")
    proc = _profile(tmp_path, "--data", "no/such/file.txt", "--out", "prof", timeout=300)
    assert proc.returncode == EXIT_USAGE
    assert str(tmp_path / "no" / "such" / "file.txt") in proc.stderr
