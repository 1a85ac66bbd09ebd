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
    from jh2.connection import H2Connection as _H2Connection
    from jh2.errors import ErrorCodes
    from jh2.exceptions import ProtocolError
    from jh2.settings import SettingCodes, Settings
    from jh2.stream import StreamState

    _OPEN = StreamState.OPEN
    _HALF_CLOSED_LOCAL = StreamState.HALF_CLOSED_LOCAL
    _HALF_CLOSED_REMOTE = StreamState.HALF_CLOSED_REMOTE
    _CLOSED = StreamState.CLOSED

    class H2Connection(_H2Connection):
        """jh2's connection with a cheaper open-stream count.

        jh2 counts open streams (and forgets closed ones) by walking every stream
        through two properties, once per stream opened in each direction; this walk
        reads the states directly, with the same result (tests/unit/test_l7_h2lib.py).
        """

        def _open_streams(self, remainder: int) -> int:
            count = 0
            closed: list[int] | None = None
            for stream_id, stream in self.streams.items():
                state = stream.state_machine.state
                if state is _CLOSED:
                    if closed is None:
                        closed = []
                    closed.append(stream_id)
                elif (
                    state is _OPEN or state is _HALF_CLOSED_LOCAL or state is _HALF_CLOSED_REMOTE
                ) and stream_id % 2 == remainder:
                    count += 1
            if closed is not None:
                for stream_id in closed:
                    stream = self.streams.pop(stream_id)
                    self._closed_streams[stream_id] = stream.closed_by
            return count


__all__ = [
    "ErrorCodes",
    "H2Configuration",
    "H2Connection",
    "ProtocolError",
    "SettingCodes",
    "Settings",
    "events",
]
