"""Small GeoIP2-Country databases for tests, built with a maintained writer (mmdb-writer)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mmdb_writer import MMDBWriter
from netaddr import IPSet

__all__ = ["write_country_db"]


def write_country_db(
    path: Path, countries: Mapping[str, str], registered: Mapping[str, str] | None = None
) -> Path:
    """Write ``{cidr: ISO code}`` as a GeoIP2-Country database (IPv6 tree, IPv4 inside).

    ``registered`` networks get only a ``registered_country``, like networks
    whose location MaxMind does not know. The file is replaced atomically
    (written beside, then renamed), as ``geoipupdate`` does.
    """
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoIP2-Country")
    for cidr, code in countries.items():
        writer.insert_network(IPSet([cidr]), {"country": {"iso_code": code}})
    for cidr, code in (registered or {}).items():
        writer.insert_network(IPSet([cidr]), {"registered_country": {"iso_code": code}})
    partial = path.with_name(path.name + ".partial")
    writer.to_db_file(str(partial))
    os.replace(partial, path)
    return path
