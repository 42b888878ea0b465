"""One root exception; each layer adds a small family under it."""


class FastmatchError(Exception):
    """Root of every error fastmatch raises on purpose."""


class ConfigError(FastmatchError):
    """The configuration is invalid; the message names the offending key."""
