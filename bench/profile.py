"""Where an mc-proxy worker spends its time under one scenario's load (py-spy).

``python -m bench.profile l4_connrate`` starts the backends and one mc-proxy
worker, runs the scenario's load while ``py-spy record --gil`` samples the
worker whenever it runs Python (``--native`` adds C frames, so time in the
kernel and in OpenSSL shows under the Python call that made it, at the price
of stopping the worker for each sample), and prints the functions with the
most samples, by own time and by total time. py-spy is not a dependency of the project:
``.venv/bin/pip install py-spy``. The raw collapsed stacks are kept for
flame graphs (``--keep DIR``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from bench import scenarios
from bench.backends import ResponderBackend, SourceBackend
from bench.proxies import McProxy, Upstreams
from bench.settings import Settings
from mcproxy.devcerts import issue, make_ca

__all__ = ["main", "summarize"]


def summarize(collapsed: str, top: int = 25) -> str:
    """Own and total sample counts per frame from py-spy's ``--format raw`` output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [_short(frame) for frame in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [f"{samples} samples", "", "own time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    lines += ["", "total time:"]
    lines += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in total.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py:123)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument(
        "scenario",
        choices=["l4_bulk", "l4_connrate", "l7_h2", "l7_http1", "l7_h2_h1back", "l7_http1_h1back"],
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--keep", type=Path, help="directory for the collapsed stacks")
    parser.add_argument(
        "--native", action="store_true", help="native frames too (stops the worker per sample)"
    )
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    settings = Settings(
        bulk_size=2 << 30, connrate_seconds=args.seconds, l7_seconds=args.seconds, workers=(1,)
    )
    with tempfile.TemporaryDirectory(prefix="mc-proxy-profile-") as tmp:
        directory = Path(tmp)
        ca = make_ca()
        bulk_cert, bulk_key = issue(ca, "bulk.test", directory)
        conn_cert, conn_key = issue(ca, "conn.test", directory)
        l7_cert, l7_key = issue(ca, "localhost", directory)
        conn_pem, l7_pem = directory / "conn.pem", directory / "l7.pem"
        conn_pem.write_bytes(conn_cert.read_bytes() + conn_key.read_bytes())
        l7_pem.write_bytes(l7_cert.read_bytes() + l7_key.read_bytes())
        source = SourceBackend(bulk_cert, bulk_key)
        responder = ResponderBackend(directory, conn_pem, 2000)
        upstreams = Upstreams(
            source.port,
            responder.tls_port,
            responder.h2c_port,
            l7_cert,
            l7_key,
            l7_pem,
            responder.h1_port,
        )
        proxy = McProxy(directory / "mc-proxy", upstreams, workers=1)
        proxy.start()
        try:
            worker = proxy.tree.pids()[1]
            collapsed = directory / "profile.txt"
            # --gil: samples only while the worker runs Python, not while it waits in epoll.
            how = ["--native"] if args.native else ["--gil", "--nonblocking"]
            recorder = subprocess.Popen(
                [
                    py_spy,
                    "record",
                    *how,
                    "--format=raw",
                    f"--rate={args.rate}",
                    f"--pid={worker}",
                    f"--output={collapsed}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            measure = partial(getattr(scenarios, args.scenario), proxy, settings)
            figures = measure()
            recorder.send_signal(2)  # SIGINT: py-spy writes its output and exits
            recorder.wait(30)
        finally:
            proxy.stop()
            source.stop()
            responder.stop()
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()})
        print(summarize(collapsed.read_text()))
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(collapsed, args.keep / f"{args.scenario}.collapsed.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
