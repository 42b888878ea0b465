"""Token verification at the WebSocket handshake (PROTOCOL 1 "Authentication")."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import jwt
from jwt.algorithms import HMACAlgorithm
from jwt.api_jws import PyJWS

from server.config import MAX_RATING, AuthConfig
from server.errors import ConfigError, FastmatchError

PLAYER_ID_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # whole string: use fullmatch
_MAX_ATTRS: Final = 16
_MAX_ATTR_LEN: Final = 64


class AuthError(FastmatchError):
    """The token is missing, expired, badly signed or malformed (HTTP 401)."""


@dataclass(frozen=True, slots=True)
class Identity:
    player_id: str
    mmr: float | Mapping[str, float] | None = None
    attrs: Mapping[str, str | int | float] = field(default_factory=dict)

    def rating(self, game_mode: str, default: float) -> float:
        """The trusted rating for a mode: per-mode claim, then a plain number, then the default."""
        if isinstance(self.mmr, Mapping):
            return float(self.mmr.get(game_mode, default))
        return float(self.mmr) if self.mmr is not None else default


class _CheckedSecret(HMACAlgorithm):
    """HMAC whose configured secret was checked once. PyJWT checks the key again for every
    token, trying to parse it as an asymmetric key or certificate (its guard against
    algorithm confusion): about a third of a token's verification, for the same secret."""

    def __init__(self, algorithm: str, secret: bytes) -> None:
        super().__init__(getattr(HMACAlgorithm, "SHA" + algorithm[2:]))
        self.secret = super().prepare_key(secret)

    def prepare_key(self, key: str | bytes) -> bytes:
        return self.secret if key is self.secret else super().prepare_key(key)


class TokenVerifier:
    """Verifies handshake tokens with a key prepared once."""

    def __init__(self, config: AuthConfig) -> None:
        self.algorithm = config.algorithm
        self.leeway = config.leeway_s
        self._algorithms = [config.algorithm]
        self._jwt = jwt.PyJWT(options={"require": ["sub", "exp"]})
        self._key: Any
        if config.algorithm.startswith("HS"):
            checked = _CheckedSecret(config.algorithm, config.secret.encode())
            jws = getattr(self._jwt, "_jws", None)  # PyJWT's signature layer (2.x)
            if isinstance(jws, PyJWS):
                jws.unregister_algorithm(config.algorithm)
                jws.register_algorithm(config.algorithm, checked)
            self._key = checked.secret
        else:
            try:
                pem = Path(config.public_key_file).read_bytes()
            except OSError as exc:
                raise ConfigError(f"auth.public_key_file: cannot read: {exc}") from exc
            try:
                self._key = jwt.get_algorithm_by_name(config.algorithm).prepare_key(pem)
            except (ValueError, TypeError, jwt.InvalidKeyError) as exc:
                raise ConfigError(f"auth.public_key_file: not a usable key: {exc}") from exc

    def verify(self, token: str | None) -> Identity:
        if not token:
            raise AuthError("missing token")
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token, self._key, algorithms=self._algorithms, leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError("token expired") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthError("bad token signature") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from exc
        return _identity(claims)


def _identity(claims: Mapping[str, Any]) -> Identity:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not PLAYER_ID_RE.fullmatch(sub):
        raise AuthError("claim `sub` must be 1-64 characters of [A-Za-z0-9_.:-]")
    return Identity(sub, _mmr(claims.get("mmr")), _attrs(claims.get("attrs")))


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past a float's range (10**400): not a rating
        return False


def _rating(value: object) -> bool:
    return _is_number(value) and abs(cast(float, value)) <= MAX_RATING


def _mmr(value: object) -> float | dict[str, float] | None:
    if value is None:
        return None
    if _rating(value):
        return float(value)  # type: ignore[arg-type]
    if isinstance(value, dict) and all(isinstance(k, str) and _rating(v) for k, v in value.items()):
        return {k: float(v) for k, v in value.items()}
    raise AuthError("claim `mmr` must be a number or an object of numbers per game mode, "
                    f"each within +-{MAX_RATING:.0e}")


def _attrs(value: object) -> dict[str, str | int | float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > _MAX_ATTRS:
        raise AuthError(f"claim `attrs` must be an object of at most {_MAX_ATTRS} entries")
    out: dict[str, str | int | float] = {}
    for key, item in value.items():
        small_str = isinstance(item, str) and len(item) <= _MAX_ATTR_LEN
        if not isinstance(key, str) or len(key) > _MAX_ATTR_LEN or not (small_str or _is_number(item)):
            raise AuthError("claim `attrs` values must be short strings or numbers")
        out[key] = item
    return out


def mint_token(
    secret: str, player_id: str, mmr: float | None = None, ttl_s: int = 3600,
    attrs: Mapping[str, str | int | float] | None = None, algorithm: str = "HS256",
    now: float | None = None,
) -> str:
    """A development token signed with the configured HMAC secret (``fastmatch token``).

    Its claims pass the verifier's own checks, so it mints nothing the server would refuse
    (a rating of nan, inf or past MAX_RATING) except by ``ttl_s``: tests mint expired tokens."""
    if not PLAYER_ID_RE.fullmatch(player_id):
        raise AuthError("player id must be 1-64 characters of [A-Za-z0-9_.:-]")
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": player_id, "iat": issued, "exp": issued + ttl_s}
    if mmr is not None:
        _mmr(mmr)  # raises AuthError as the verifier would
        claims["mmr"] = mmr
    if attrs:
        claims["attrs"] = _attrs(dict(attrs))
    return jwt.encode(claims, secret, algorithm=algorithm)
