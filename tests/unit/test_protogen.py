"""The committed generated code is exactly what ``make proto`` makes of the proto today."""

from __future__ import annotations

from pathlib import Path

from mcproxy.admin import protogen


def test_committed_generated_code_matches_the_proto(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(protogen.GENERATED)
    stale = [
        path.name
        for path in written
        if path.read_text() != (protogen.PACKAGE_DIR / path.name).read_text()
    ]
    assert not stale, f"out of date: {stale}; run `make proto` and commit the result"


def test_generated_modules_import_as_a_package() -> None:
    from mcproxy.admin.v1 import admin_pb2, admin_pb2_grpc

    service = admin_pb2.DESCRIPTOR.services_by_name["ProxyAdminService"]
    assert service.full_name == "mc_proxy.v1.ProxyAdminService"
    # the one cross-module import was rewritten from `mc_proxy.v1` to the package path
    assert getattr(admin_pb2_grpc, "mc__proxy_dot_v1_dot_admin__pb2") is admin_pb2  # noqa: B009
