from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import CA, make_ca
from tests.e2e.harness import TlsBackend, tls_backends

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e ``e2e``, so ``-m "not e2e"`` runs the unit tests alone.

    (A ``pytestmark`` in a conftest marks nothing: only test modules' own count.) The hook
    sees every collected item, the unit tests' too, hence the path check.
    """
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def ca() -> CA:
    return make_ca()


@pytest.fixture
def backends(tmp_path: Path, ca: CA) -> Iterator[dict[str, TlsBackend]]:
    """Two TLS backends, each with its own certificate for its own hostname."""
    with tls_backends(tmp_path, ca, ["alpha.test", "beta.test"]) as running:
        yield running
