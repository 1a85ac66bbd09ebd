"""The access-log line: every field, in order, for a relayed and for a refused connection."""

from __future__ import annotations

import re

from mcproxy.model import Address, Mode, Route
from mcproxy.worker.records import ConnectionRecord


def test_relayed_connection_line() -> None:
    record = ConnectionRecord("127.0.0.1:443", ("192.0.2.7", 50000), ("127.0.0.1", 443))
    record.sni = "a.test"
    record.route = Route("a.test", (Address("127.0.0.1", 8443),), Mode.L4)
    record.bytes_up, record.bytes_down, record.outcome = 517, 4096, "closed"
    line = re.sub(r"duration=\d+\.\d{3}", "duration=D", record.log_line())
    assert line == (
        "client=192.0.2.7 listener=127.0.0.1:443 sni=a.test route=a.test mode=l4 "
        "backend=127.0.0.1:8443 up=517 down=4096 duration=D outcome=closed"
    )


def test_refused_connection_line_quotes_the_detail() -> None:
    record = ConnectionRecord("[::]:443", ("2001:db8::7", 50000), ("::1", 443))
    record.outcome, record.detail = "refused:no_route", "unknown SNI 'b.test' \"x\""
    line = re.sub(r"duration=\d+\.\d{3}", "duration=D", record.log_line())
    assert line == (
        "client=2001:db8::7 listener=[::]:443 sni=- route=- mode=- backend=- up=0 down=0 "
        "duration=D outcome=refused:no_route detail=\"unknown SNI 'b.test' 'x'\""
    )
