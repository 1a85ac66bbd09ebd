"""L7 routes: terminate TLS with the route's certificate and reverse proxy HTTP/2 and HTTP/1.1.

Sans-I/O cores (``frames``, ``tls``, ``headers``, ``bridge``, ``h2legs``,
``h11front``, ``pool``, ``router``, ``certs``) and one module of asyncio glue
(``proxy``). ARCHITECTURE.md walks through how they fit.
"""

from mcproxy.worker.l7.proxy import L7Proxy

__all__ = ["L7Proxy"]
