"""``make run`` runs ``mc-proxy demo``: the commands it prints must work as printed, in order."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import REPO_ROOT, wait_for

CURL_RESET = (7, 35, 56)
"""curl's exit status for a connection reset: before curl saw the connection up (7), during
the TLS handshake (35), or on a read (56). A refusal at accept can land on either side."""


def printed_commands(text: str) -> list[str]:
    """The commands under "Try, in another terminal:", continuation lines joined."""
    lines = [line.strip() for line in re.sub(r"\\\n\s*", " ", text).splitlines()]
    start = lines.index("Try, in another terminal:") + 1
    end = lines.index("Ctrl-C stops the proxy and the backends.")
    return [line for line in lines[start:end] if line and not line.startswith("#")]


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
        commands = printed_commands(log.read_text())
        exports: list[str] = []
        results: list[tuple[str, int, str]] = []
        for command in commands:
            if command.startswith("export "):
                exports.append(command)
            elif command.startswith("grpcurl "):
                continue  # not installed here; tests/e2e/test_l7_grpc.py covers gRPC
            else:
                run = subprocess.run(
                    ["bash", "-c", "; ".join([*exports, command])],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=30,
                    check=False,
                )
                results.append((command.split()[0].rsplit("/", 1)[-1], run.returncode, run.stdout))
        assert [program for program, _, _ in results] == [
            *["curl"] * 5,
            *["mcproxyctl"] * 2,
            "curl",
            *["mcproxyctl"] * 2,
            "curl",
            "mcproxyctl",
            "curl",
        ], commands
        (
            alpha,
            beta,
            web,
            bad_bot,
            unknown,
            status,
            added,
            new_route,
            listed,
            blocked,
            while_blocked,
            unblocked,
            metrics,
        ) = results
        assert alpha[1:] == (0, "hello from the alpha backend (TLS passed through by mc-proxy)\n")
        assert beta[1:] == (0, "hello from the beta backend (TLS passed through by mc-proxy)\n")
        assert web[1] == 0 and "x-forwarded-for: 127.0.0.1" in web[2] and ":path: /hi" in web[2]
        assert bad_bot[1:] == (0, "403\n")
        assert unknown[1] in CURL_RESET
        assert status[1] == 0 and status[2].startswith("mc-proxy ")
        assert added[1] == 0 and "added route gamma.demo.test" in added[2]
        assert new_route[1] == 0 and ":path: /new" in new_route[2]
        assert listed[1] == 0 and "gamma.demo.test" in listed[2]
        assert blocked[1] == 0 and while_blocked[1] in CURL_RESET and unblocked[1] == 0
        assert metrics[1] == 0 and re.search(r"^mcproxy_connections_total\{", metrics[2], re.M)
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
