"""GeoIP lookups and reloads over databases written by mmdb-writer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mcproxy.worker.geoip import GeoIP, GeoIPError
from tests.geoipdb import write_country_db

COUNTRIES = {"203.0.113.0/24": "KP", "198.51.100.0/24": "FR", "2001:db8:1::/48": "KP"}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return write_country_db(tmp_path / "country.mmdb", COUNTRIES)


def test_ipv4_and_ipv6_lookups(db: Path) -> None:
    geoip = GeoIP(str(db))
    assert geoip.country("203.0.113.9") == "KP"
    assert geoip.country("198.51.100.200") == "FR"
    assert geoip.country("2001:db8:1:ffff::1") == "KP"
    assert geoip.country("2001:db8:2::1") is None
    assert geoip.country("192.0.2.1") is None


def test_registered_country_stands_in_for_an_unknown_location(tmp_path: Path) -> None:
    db = write_country_db(tmp_path / "c.mmdb", {}, registered={"192.0.2.0/24": "CN"})
    assert GeoIP(str(db)).country("192.0.2.1") == "CN"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GeoIPError, match=r"missing\.mmdb: file not found"):
        GeoIP(str(tmp_path / "missing.mmdb"))


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mmdb"
    bad.write_bytes(b"this is not a MaxMind DB" * 10)
    with pytest.raises(GeoIPError, match="not a readable MaxMind DB"):
        GeoIP(str(bad))


def test_replaced_file_is_reopened_by_refresh(db: Path) -> None:
    geoip = GeoIP(str(db))
    assert not geoip.refresh()
    write_country_db(db, {**COUNTRIES, "198.51.100.0/24": "KP"})
    assert geoip.refresh()
    assert geoip.country("198.51.100.1") == "KP"
    assert not geoip.refresh()


def test_unreadable_replacement_keeps_the_old_database(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    geoip = GeoIP(str(db))
    partial = db.with_name("new")
    partial.write_bytes(b"truncated download")
    partial.replace(db)
    with caplog.at_level(logging.ERROR, logger="mcproxy.worker"):
        assert not geoip.refresh()
        assert not geoip.refresh()  # the same bad file is reported once
    assert len([r for r in caplog.records if "keeping the previous" in r.message]) == 1
    assert geoip.country("203.0.113.1") == "KP"
    write_country_db(db, COUNTRIES)
    assert geoip.refresh()


def test_removed_file_keeps_the_open_database(db: Path) -> None:
    geoip = GeoIP(str(db))
    db.unlink()
    assert not geoip.refresh()
    assert geoip.country("203.0.113.1") == "KP"


def test_country_rules_need_a_readable_database_at_start(tmp_path: Path, db: Path) -> None:
    from mcproxy.config import Config, FirewallSettings
    from mcproxy.model import FirewallRules, ProxyState
    from mcproxy.supervisor.main import geoip_problem

    blocking = ProxyState(firewall=FirewallRules(blocked_countries=frozenset({"KP", "CN"})))
    without = Config(path="/etc/mc-proxy.yaml")
    assert geoip_problem(without, ProxyState()) is None
    assert geoip_problem(without, blocking) == (
        "/etc/mc-proxy.yaml: firewall.geoip_db: required: the firewall blocks countries CN, KP"
    )
    missing = Config(path="c.yaml", firewall=FirewallSettings(geoip_db=str(tmp_path / "gone")))
    assert "gone: file not found (the firewall blocks countries CN, KP)" in str(
        geoip_problem(missing, blocking)
    )
    usable = Config(path="c.yaml", firewall=FirewallSettings(geoip_db=str(db)))
    assert geoip_problem(usable, blocking) is None


def test_cache_stays_bounded(db: Path) -> None:
    from mcproxy.worker import geoip as module

    geoip = GeoIP(str(db))
    for i in range(module.CACHE_SIZE + 10):
        assert geoip.country(f"10.0.{i // 256}.{i % 256}") is None
    assert len(geoip._cache) <= module.CACHE_SIZE
    assert geoip.country("203.0.113.1") == "KP"
