"""``mc-proxy check`` as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.e2e.harness import REPO_ROOT


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mcproxy", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
        check=False,
    )


def test_a_valid_config_passes(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workers": 2,
                "listeners": [
                    {"addr": ":8443", "routes": [{"hostname": "a.test", "backend": "127.0.0.1:1"}]}
                ],
            }
        )
    )
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{path}: OK"


def test_every_problem_is_printed_with_its_field_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "workers": -1,
                "proxy": {"idle_timeout": "soon"},
                "listeners": [
                    {
                        "addr": ":8443",
                        "routes": [
                            {"hostname": "a.test", "backend": "127.0.0.1"},
                            {"hostname": "b.test", "backend": "127.0.0.1:1", "mode": "l7"},
                        ],
                        "rotues": [],
                    }
                ],
            }
        )
    )
    result = check(path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    fields = {line.split(": ")[1] for line in lines}
    assert {
        "workers",
        "proxy.idle_timeout",
        "listeners[0].routes[0].backend",
        "listeners[0].routes[1].tls_cert",
        "listeners[0].rotues",
    } <= fields, lines
    assert all(line.startswith(f"{path}: ") for line in lines)


def test_a_missing_file_is_reported(tmp_path: Path) -> None:
    result = check(tmp_path / "absent.yaml")
    assert result.returncode == 1
    assert "absent.yaml" in result.stderr
