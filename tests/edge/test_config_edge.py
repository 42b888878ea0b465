"""The edge's configuration keys: typed from the environment, refused with the key named."""

from __future__ import annotations

import pytest

from server.config import load_config
from server.errors import ConfigError


def test_edge_keys_from_the_environment() -> None:
    server = load_config(environ={
        "FASTMATCH_SERVER__PROXY_PROTOCOL": "true",
        "FASTMATCH_SERVER__PROXY_TRUSTED": '["10.0.0.0/24", "2001:db8::1"]',
        "FASTMATCH_SERVER__TLS_CERT_FILE": "/etc/fastmatch/fullchain.pem",
        "FASTMATCH_SERVER__DRAIN_DELAY_S": "3",
    }).server
    assert server.proxy_protocol and server.proxy_trusted == ("10.0.0.0/24", "2001:db8::1")
    assert server.tls_cert_file == "/etc/fastmatch/fullchain.pem" and server.tls_key_file == ""
    assert (server.drain_delay_s, server.drain_timeout_s) == (3.0, 15.0)


def test_defaults_leave_the_edge_off_and_delay_the_drain() -> None:
    server = load_config(environ={}).server
    assert not server.proxy_protocol and not server.tls_cert_file
    assert 0 < server.drain_delay_s < server.drain_timeout_s


@pytest.mark.parametrize(("environ", "named"), [
    ({"FASTMATCH_SERVER__DRAIN_DELAY_S": "15"}, "`server.drain_delay_s`"),
    ({"FASTMATCH_SERVER__DRAIN_DELAY_S": "-1"}, "`server.drain_delay_s`"),
    ({"FASTMATCH_SERVER__PROXY_PROTOCOL": "true"}, "`server.proxy_trusted`"),
    ({"FASTMATCH_SERVER__PROXY_TRUSTED": '["10.0.0.1/24"]'}, "`server.proxy_trusted`"),
    ({"FASTMATCH_SERVER__PROXY_TRUSTED": '["balancer.local"]'}, "`server.proxy_trusted`"),
    ({"FASTMATCH_SERVER__PROXY_HEADER_TIMEOUT_S": "0"}, "`server.proxy_header_timeout_s`"),
    ({"FASTMATCH_SERVER__TLS_KEY_FILE": "/k.pem"}, "`server.tls_key_file`"),
], ids=["delay-past-timeout", "negative-delay", "proxy-without-trusted", "cidr-host-bits",
        "hostname", "header-timeout", "key-without-cert"])
def test_bad_edge_settings_name_their_key(environ: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ)
    assert named in str(caught.value)
