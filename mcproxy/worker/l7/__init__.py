"""L7 routes: terminate TLS with the route's certificate and reverse proxy HTTP/2 and HTTP/1.1.

Sans-I/O cores (``frames``, ``tls``, ``certs``, ``headers``, ``bridge``,
``h2leg``, ``h2front``, ``h2back``, ``h11front``, ``pool``, ``router``) and
asyncio glue (``channel``, ``proxy``). ARCHITECTURE.md walks through how they fit.
"""

from mcproxy.worker.l7.proxy import L7Proxy

__all__ = ["L7Proxy"]
