from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cotune(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cotune", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_help_lists_the_subcommands():
    out = cotune("--help")
    assert out.returncode == 0
    for cmd in ("provision", "broker", "demo", "zoo"):
        assert cmd in out.stdout


def test_provision_then_refuse_to_overwrite(tmp_path):
    out = cotune("provision", "--out", str(tmp_path / "fed"), "--federation", "clitest", "--clients", "d1,d2")
    assert out.returncode == 0, out.stderr
    doc = json.loads((tmp_path / "fed" / "federation.json").read_text())
    assert set(doc["directory"]["parties"]) == {"aggregator"}  # clients are in the registry
    from bridge.provision import FederationPaths

    assert {p.party_id for p in FederationPaths.open(tmp_path / "fed").directory()} == {"aggregator", "d1", "d2"}
    again = cotune("provision", "--out", str(tmp_path / "fed"), "--federation", "clitest", "--clients", "d1")
    assert again.returncode == 2 and "ProvisioningError" in again.stderr


def test_wire_demo_exchanges_an_encrypted_blob(tmp_path):
    out = cotune("demo", "--algorithm", "wire", "--size-mb", "3", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "wire_report.json").read_text())
    assert report["verified"] and report["ack_received"]
    assert report["plaintext_marker_frames_on_wire"] == 0
    assert report["ciphertext_entropy_bits_per_byte"] > 7.9
    assert report["wire_bytes"] > report["blob_bytes"]
