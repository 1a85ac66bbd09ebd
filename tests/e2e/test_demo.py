"""``make run`` runs ``mc-proxy demo``: the commands it prints must work as printed."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import REPO_ROOT, wait_for


def test_demo_commands_work_as_printed(tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "mcproxy", "demo", "--dir", str(tmp_path / "demo")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: len(re.findall(r"worker \d serving", log.read_text())) == 2, 30, "demo up")
        text = log.read_text()
        # Every `curl` line the demo prints, joined across its backslash continuations.
        commands = [
            line.split("#")[0].strip()
            for line in re.sub(r"\\\n\s*", " ", text).splitlines()
            if line.strip().startswith("curl ") and "/metrics" not in line
        ]
        assert len(commands) == 5, commands
        results = {}
        for command in commands:
            run = subprocess.run(
                shlex.split(command), capture_output=True, text=True, timeout=30, check=False
            )
            results[command] = (run.returncode, run.stdout)
        outputs = list(results.values())
        assert outputs[0] == (0, "hello from the alpha backend (TLS passed through by mc-proxy)\n")
        assert outputs[1] == (0, "hello from the beta backend (TLS passed through by mc-proxy)\n")
        code, body = outputs[2]
        assert code == 0 and "x-forwarded-for: 127.0.0.1" in body and ":path: /hi" in body
        assert outputs[3] == (0, "403\n")
        assert outputs[4][0] == 35  # curl: connection reset during the handshake
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "mcproxy.admin.cli",
                "--socket",
                str(tmp_path / "demo" / "admin.sock"),
                "routes",
                "list",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        assert "web.demo.test" in status.stdout
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
