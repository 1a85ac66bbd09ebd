"""``packaging/``: the example configs pass ``mc-proxy check``, and fit the unit and the image.

The examples name files that exist only on a real box (certificates, the
GeoIP database). Each test writes generated ones, substitutes their paths
for the example's, proves that the substitution is the only change, and runs
the real ``mc-proxy check``: an example that drifts from the schema fails here.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcproxy.cli import build_parser
from mcproxy.config import load_config, parse_duration
from mcproxy.demo import DEMO_PORT
from tests.certs import CA, issue
from tests.e2e.harness import REPO_ROOT
from tests.geoipdb import write_country_db

PACKAGING = REPO_ROOT / "packaging"
EXAMPLES = sorted((PACKAGING / "examples").glob("*.yaml"))
UNIT = PACKAGING / "mc-proxy.service"
CONTAINERFILE = PACKAGING / "Containerfile"
SHUTDOWN_GRACE = 5.0
"""The supervisor waits this long after shutdown_timeout before it kills workers."""


def _route_files(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(hostname, tls_cert, tls_key)`` of every L7 route in the example."""
    return [
        (route["hostname"], route["tls_cert"], route["tls_key"])
        for listener in data.get("listeners") or []
        for route in listener.get("routes") or []
        if route.get("mode") == "l7"
    ]


def _replace_values(value: Any, paths: dict[str, str]) -> Any:
    """``value`` with every string that is a key of ``paths`` replaced."""
    if isinstance(value, dict):
        return {k: _replace_values(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_values(v, paths) for v in value]
    if isinstance(value, str):
        return paths.get(value, value)
    return value


def _real_files(example: Path, directory: Path, ca: CA) -> Path:
    """The example with generated certificates and GeoIP database in place of its paths."""
    text = example.read_text()
    data = yaml.safe_load(text)
    paths: dict[str, str] = {}
    for hostname, cert, key in _route_files(data):
        if cert not in paths:
            new_cert, new_key = issue(ca, hostname, directory)
            paths[cert], paths[key] = str(new_cert), str(new_key)
    geoip = (data.get("firewall") or {}).get("geoip_db")
    if geoip is not None:
        db = write_country_db(directory / "GeoLite2-Country.mmdb", {"203.0.113.0/24": "ZZ"})
        paths[geoip] = str(db)
    for old, new in paths.items():
        assert old in text, old
        text = text.replace(old, new)
    assert yaml.safe_load(text) == _replace_values(data, paths), "more than the paths changed"
    result = directory / example.name
    result.write_text(text)
    return result


def test_the_three_deployments_have_examples() -> None:
    assert [p.name for p in EXAMPLES] == ["edge.yaml", "origin.yaml", "single-node.yaml"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_passes_check(example: Path, tmp_path: Path, ca: CA) -> None:
    config = _real_files(example, tmp_path, ca)
    result = subprocess.run(
        [sys.executable, "-m", "mcproxy", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout == f"{config}: OK\n"


def _unit() -> dict[str, list[str]]:
    """The unit's settings, each key with every value it is given (Environment= repeats)."""
    settings: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_examples_use_the_directories_the_unit_provides(tmp_path: Path, ca: CA) -> None:
    unit = _unit()
    (config_dir,) = unit["ConfigurationDirectory"]
    (exec_start,) = unit["ExecStart"]
    assert shlex.split(exec_start)[1:] == ["serve", "--config", f"/etc/{config_dir}/mc-proxy.yaml"]
    environment = dict(v.split("=", 1) for v in unit["Environment"])
    (stop_timeout,) = unit["TimeoutStopSec"]
    for example in EXAMPLES:
        config = load_config(str(_real_files(example, tmp_path, ca)))
        assert config.database_path == f"/var/lib/{unit['StateDirectory'][0]}/mc-proxy.db"
        assert config.admin_socket == f"/run/{unit['RuntimeDirectory'][0]}/admin.sock"
        assert environment["MCPROXY_SOCKET"] == config.admin_socket
        # systemd must not SIGKILL the supervisor while it still waits for the drain.
        assert config.proxy.shutdown_timeout + SHUTDOWN_GRACE < parse_duration(stop_timeout)
        for _, cert, key in _route_files(yaml.safe_load(example.read_text())):
            assert cert.startswith(f"/etc/{config_dir}/") and key.startswith(f"/etc/{config_dir}/")


def test_edge_forwards_to_an_origin_listener_that_serves_its_hostnames() -> None:
    edge = yaml.safe_load((PACKAGING / "examples" / "edge.yaml").read_text())
    origin = yaml.safe_load((PACKAGING / "examples" / "origin.yaml").read_text())
    (edge_listener,) = edge["listeners"]
    (origin_listener,) = origin["listeners"]
    assert origin_listener["proxy_protocol"] is True
    origin_port = origin_listener["addr"].rpartition(":")[2]
    for route in edge_listener["routes"]:
        assert route.get("mode", "l4") == "l4" and route["send_proxy_protocol"] is True
        assert route["backend"].rpartition(":")[2] == origin_port
    served = {route["hostname"] for route in origin_listener["routes"]}
    assert {route["hostname"] for route in edge_listener["routes"]} == served
    assert {route.get("mode", "l4") for route in origin_listener["routes"]} == {"l4", "l7"}


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists: point it at this checkout's.
    installed = shutil.which("mc-proxy", path=str(Path(sys.executable).parent))
    assert installed is not None, "mc-proxy is not installed beside this Python"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/mc-proxy/bin/mc-proxy", installed))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def _instructions() -> list[tuple[str, str]]:
    """The Containerfile's instructions as ``(KEYWORD, arguments)``, continuations joined."""
    instructions: list[tuple[str, str]] = []
    joined = CONTAINERFILE.read_text().replace("\\\n", " ")
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def test_containerfile_copies_files_that_exist() -> None:
    sources: list[str] = []
    for keyword, args in _instructions():
        words = args.split()
        if keyword == "COPY" and not words[0].startswith("--from="):
            sources += words[:-1]  # the last word is the destination
    assert sources, "no COPY from the build context"
    for source in sources:
        assert (REPO_ROOT / source).exists(), source


def test_container_runs_the_demo_as_a_non_root_user_reachable_from_outside() -> None:
    instructions = _instructions()
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    settings = {keyword: args for keyword, args in final_stage}
    assert settings["USER"].split(":")[0] not in ("root", "0")
    assert json.loads(settings["ENTRYPOINT"]) == ["mc-proxy"]
    args = build_parser().parse_args(json.loads(settings["CMD"]))
    assert args.command == "demo"
    assert args.listen == "0.0.0.0", "a demo on the container's loopback cannot be published"
    assert settings["EXPOSE"] == str(DEMO_PORT)
