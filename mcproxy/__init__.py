"""mc-proxy: a TLS ingress proxy that routes by SNI, as L4 passthrough or L7 HTTP/2 proxy."""

__version__ = "0.1.0"
