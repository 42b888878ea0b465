"""The production edge: PROXY protocol, TLS, balancer drain, HAProxy in front (issue 12)."""
