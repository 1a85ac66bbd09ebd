"""Generate ``mcproxy/admin/v1`` from ``proto/mc_proxy/v1/admin.proto`` (``make proto``).

protoc names Python imports after the proto path (``from mc_proxy.v1 import
admin_pb2``), but the package ships the code as ``mcproxy.admin.v1``; the one
import that crosses files is rewritten so the generated modules import as a
package without touching ``sys.path``. The test suite regenerates into a
temporary directory and compares, so committed code cannot drift from the proto.

Needs grpcio-tools (a test dependency), pinned in pyproject.toml because the
output embeds the generator's version.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["GENERATED", "PROTO", "PROTO_ROOT", "generate", "main"]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO = "mc_proxy/v1/admin.proto"
PACKAGE_DIR = REPO_ROOT / "mcproxy" / "admin" / "v1"
GENERATED = ("admin_pb2.py", "admin_pb2.pyi", "admin_pb2_grpc.py")

_PROTO_IMPORT = "from mc_proxy.v1 import admin_pb2 as"
_PACKAGE_IMPORT = "from mcproxy.admin.v1 import admin_pb2 as"


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules into ``out_dir``; returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory() as raw:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={raw}",
            f"--pyi_out={raw}",
            f"--grpc_python_out={raw}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = (Path(raw) / "mc_proxy" / "v1" / name).read_text()
            text = text.replace(_PROTO_IMPORT, _PACKAGE_IMPORT)
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcproxy.admin.protogen")
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
