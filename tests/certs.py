"""The tests' certificates come from the same place as the demo's."""

from mcproxy.devcerts import CA, issue, issue_client, key_pem, make_ca, make_self_signed

__all__ = ["CA", "issue", "issue_client", "key_pem", "make_ca", "make_self_signed"]
