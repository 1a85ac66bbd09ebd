from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.certs import CA, make_ca
from tests.e2e.harness import TlsBackend, tls_backends

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def ca() -> CA:
    return make_ca()


@pytest.fixture
def backends(tmp_path: Path, ca: CA) -> Iterator[dict[str, TlsBackend]]:
    """Two TLS backends, each with its own certificate for its own hostname."""
    with tls_backends(tmp_path, ca, ["alpha.test", "beta.test"]) as running:
        yield running
