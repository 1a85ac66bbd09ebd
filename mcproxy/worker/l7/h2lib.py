"""The HTTP/2 state machine under both legs: jh2 at run time, h2's types for mypy.

jh2 is a maintained fork of h2 with the same API, a compiled HPACK codec and
no per-frame ``repr`` for trace logging; an A/B with ``bench`` measured about
-20% proxy CPU per HTTP/2 request (ARCHITECTURE.md, "L7 routes: speed").
It ships no ``py.typed``, so the type checker reads h2's annotations for the
same names. Tests keep h2 itself as the peer, which also checks the two
interoperate. Switching back is this one module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from h2 import events
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.errors import ErrorCodes
    from h2.exceptions import ProtocolError
    from h2.settings import SettingCodes, Settings
else:
    from jh2 import events
    from jh2.config import H2Configuration
    from jh2.connection import H2Connection
    from jh2.errors import ErrorCodes
    from jh2.exceptions import ProtocolError
    from jh2.settings import SettingCodes, Settings

__all__ = [
    "ErrorCodes",
    "H2Configuration",
    "H2Connection",
    "ProtocolError",
    "SettingCodes",
    "Settings",
    "events",
]
