"""The tests' certificates come from the same place as the demo's."""

from mcproxy.devcerts import CA, issue, key_pem, make_ca, make_self_signed

__all__ = ["CA", "issue", "key_pem", "make_ca", "make_self_signed"]
