"""Hypothesis strategies for hostile clients: WebSocket frames and HTTP upgrade requests.

A ``Scenario`` is what one fuzzed client does: the session state it is driven into first, then
a sequence of pieces (frames, valid or not, and raw bytes), cut into TCP writes anywhere.
Frames that carry a loading session id hold ``SID`` and get the real one when sent.
"""

from __future__ import annotations

import itertools
import json
import string
import warnings
from dataclasses import dataclass
from typing import Any, Final, Literal

import jwt
from hypothesis import strategies as st

from server.config import DEV_SECRET
from tests.transport.rawws import BINARY, CLOSE, CONT, PING, PONG, TEXT, close_payload, frame

SID: Final = "@SID@"  # replaced by the player's loading session id (or a stale one)
# The fuzzed worker's server.max_message_bytes. Larger than the default because hypothesis
# raises the interpreter's recursion limit by about 2,000 while an example runs (the worker's
# thread shares it): the 1,900 levels then decode, and only deeper nesting, which
# needs more than 4 KiB, still reaches the recursion limit as in a worker process.
MAX_MESSAGE_BYTES: Final = 16_384

State = Literal["connecting", "idle", "enqueuing", "queued", "dequeuing", "loading"]
STATES: Final[tuple[State, ...]] = ("connecting", "idle", "enqueuing", "queued", "dequeuing", "loading")


@dataclass(frozen=True)
class F:
    """One frame as the client writes it, valid or not."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True

    def render(self, sid: bytes, mask: bytes) -> bytes:
        return frame(self.opcode, self.payload.replace(SID.encode(), sid), fin=self.fin,
                     rsv=self.rsv, mask=mask if self.masked else None)


@dataclass(frozen=True)
class Raw:
    """Bytes that need not be frames at all: after them the stream's framing is anyone's guess."""

    data: bytes

    def render(self, sid: bytes, mask: bytes) -> bytes:
        return self.data


Piece = F | Raw


@dataclass(frozen=True)
class Scenario:
    state: State
    pieces: tuple[Piece, ...]
    cuts: tuple[float, ...]  # where the bytes are cut into separate writes, as fractions
    mask: bytes

    @property
    def framed(self) -> bool:
        """Every byte belongs to a whole frame, so the server can always find the next one."""
        return not any(isinstance(p, Raw) for p in self.pieces)

    def closes_sent(self, sid: bytes) -> list[bytes]:
        """Payloads of the close frames sent: the server may echo one back (RFC 6455 5.5.1)."""
        return [p.payload.replace(SID.encode(), sid) for p in self.pieces
                if isinstance(p, F) and p.opcode == CLOSE]

    def writes(self, sid: bytes) -> list[bytes]:
        data = b"".join(p.render(sid, self.mask) for p in self.pieces)
        points = sorted({int(c * len(data)) for c in self.cuts} | {0, len(data)})
        return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# -- message texts --------------------------------------------------------------------------------

MODES: Final = ["1v1", "5v5"]
json_scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=16)
                | st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)
request_ids = st.none() | st.text(max_size=130)  # up to 128 is valid
field_values = st.sampled_from([*MODES, SID, "", "x" * 65, "chess"]) | st.text(max_size=70) | json_values


def _message(kind: str, mode: str, sid: str, rid: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"type": kind}
    if kind == "enqueue":
        fields["game_mode"] = mode
    elif kind == "loading_complete":
        fields["loading_session_id"] = sid
    if rid is not None:
        fields["request_id"] = rid
    return fields


valid_messages = st.builds(
    _message, st.sampled_from(["enqueue", "dequeue", "status", "loading_complete"]),
    st.sampled_from(MODES), st.sampled_from([SID]) | st.text(min_size=1, max_size=64), request_ids)


def _mutate(message: dict[str, Any], how: str, pick: int, key: str, value: Any) -> dict[str, Any]:
    """``message`` with one field dropped or given another value, an extra field, or another
    ``type`` (the field is picked by ``pick``)."""
    out = dict(message)
    chosen = sorted(out)[pick % len(out)]
    if how == "drop":
        del out[chosen]
    elif how == "retype":
        out[chosen] = value
    elif how == "extra":
        out[key] = value
    elif how == "type":
        out["type"] = value if isinstance(value, str) else key
    return out


mutated_messages = st.builds(
    _mutate, valid_messages, st.sampled_from(["keep", "drop", "retype", "extra", "type"]),
    st.integers(0, 3), st.text(max_size=10), field_values)


def _nested(depth: int, bracket: str) -> str:
    """An enqueue with ``depth`` levels of nesting in a field that would be ignored."""
    opening, closing = ("[", "]") if bracket == "[" else ('{"a":', "}")
    return '{"type":"enqueue","game_mode":"1v1","x":' + opening * depth + "0" + closing * depth + "}"


# Up to MAX_MESSAGE_BYTES, past the recursion limit even as hypothesis raises it.
nested = (st.integers(1, 8_000) | st.integers(3_000, 8_000)).map(lambda d: _nested(d, "[")) | (
    st.integers(1, 2_700).map(lambda d: _nested(d, "{")))


ODD_TEXTS: Final = [
    "", " ", "null", "[]", "NaN", '{"type":"status"} {"type":"status"}',
    '{"type":"status","type":"enqueue","game_mode":"1v1"}',  # duplicate keys
    '{"type":"enqueue","game_mode":"1v1","x":1e999999}', '{"type":"status","request_id":"\\ud800"}',
    '{"type":"enqueue","game_mode":"{mm:1v1}"}', '{"type":"enqueue","game_mode":"1v1\\u0000"}',
    '{"type":"loading_complete","loading_session_id":"' + SID + '"}', "\ufeff{}",
]
texts = st.one_of(
    mutated_messages.map(json.dumps),
    st.builds(json.dumps, mutated_messages, ensure_ascii=st.booleans()),
    json_values.map(json.dumps),
    st.sampled_from(ODD_TEXTS),
    st.text(max_size=200),
    nested,
)

# -- frames ---------------------------------------------------------------------------------------

CLOSE_CODES: Final = [1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011, 1015,
                      2999, 3000, 4000, 4008, 4999, 5000, 0, 65535]
close_payloads = st.one_of(
    st.just(b""), st.binary(min_size=1, max_size=1),
    st.builds(close_payload, st.sampled_from(CLOSE_CODES) | st.integers(0, 65535),
              st.text(max_size=40).map(str.encode) | st.binary(max_size=40)),
)
text_frames = texts.map(lambda t: (F(TEXT, t.encode()),))
data_frames = st.one_of(
    text_frames,
    st.binary(max_size=64).map(lambda b: (F(TEXT, b),)),  # mostly invalid UTF-8: 1007
    (st.binary(max_size=200) | texts.map(str.encode)).map(lambda b: (F(BINARY, b),)),
    st.integers(MAX_MESSAGE_BYTES + 1, MAX_MESSAGE_BYTES + 3000).map(lambda n: (F(TEXT, b" " * n),)),
)
control_frames = st.one_of(
    st.builds(F, st.just(PING), st.binary(max_size=125)),
    st.builds(F, st.just(PONG), st.binary(max_size=125)),
    st.builds(F, st.just(CLOSE), close_payloads),
).map(lambda f: (f,))


@st.composite
def fragmented(draw: st.DrawFn) -> tuple[F, ...]:
    """One message in several frames, control frames allowed between them (RFC 6455 5.4); it
    may be left unfinished, or be too big only once its fragments are added up."""
    text = draw(texts).encode()
    if draw(st.booleans()):
        text = b" " * draw(st.integers(MAX_MESSAGE_BYTES - 100, MAX_MESSAGE_BYTES + 500))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), min_size=1, max_size=4)))
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    binary = draw(st.booleans()) and draw(st.booleans())
    out: list[F] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        out.append(F(CONT if i else BINARY if binary else TEXT, part, fin=last))
        if not last and draw(st.booleans()):
            out.append(draw(control_frames)[0])
    if draw(st.integers(0, 9)) == 0:
        out.pop()  # never finished: the next data frame is a protocol error
    return tuple(out)


violations = st.one_of(
    st.builds(F, st.sampled_from([TEXT, BINARY, PING]), st.just(b'{"type":"status"}'),
              rsv=st.integers(1, 7)).map(lambda f: (f,)),
    st.builds(F, st.sampled_from([TEXT, PING, CLOSE]), st.just(b"\x03\xe8"),
              masked=st.just(False)).map(lambda f: (f,)),
    st.builds(F, st.sampled_from([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]),
              st.binary(max_size=20)).map(lambda f: (f,)),
    st.builds(F, st.just(CONT), st.binary(max_size=20)).map(lambda f: (f,)),  # nothing to continue
    st.builds(F, st.sampled_from([PING, PONG, CLOSE]), st.binary(min_size=126, max_size=200))
    .map(lambda f: (f,)),  # control frames carry at most 125 bytes
    st.builds(F, st.sampled_from([PING, CLOSE]), st.just(b"\x03\xe8"), fin=st.just(False))
    .map(lambda f: (f,)),  # control frames cannot be fragmented
)
garbage = st.binary(min_size=1, max_size=40).map(lambda b: (Raw(b),))

units = st.one_of(text_frames, data_frames, fragmented(), control_frames, violations, garbage)


@st.composite
def scenarios(draw: st.DrawFn, state: State) -> Scenario:
    pieces = [p for unit in draw(st.lists(units, min_size=1, max_size=8)) for p in unit]
    return Scenario(
        state=state,
        pieces=tuple(pieces),
        cuts=tuple(draw(st.lists(st.floats(0, 1), max_size=6))),
        mask=draw(st.binary(min_size=4, max_size=4)),
    )


# -- HTTP upgrade requests ------------------------------------------------------------------------

def usually(value: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``value`` three times in four, else a draw from ``other``."""
    return st.sampled_from([value] * 3 + [None]).flatmap(
        lambda v: st.just(v) if v is not None else other)


def _token(claims: dict[str, Any], key: str, algorithm: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)  # short keys on purpose
        return jwt.encode(claims, key, algorithm=algorithm)


printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)
claims = st.fixed_dictionaries(
    {"sub": usually("hs-a", st.sampled_from(["hs_c.d:e-f", "x" * 64, "x" * 65, "", "a b"]) | printable),
     "exp": usually(4_000_000_000, st.sampled_from([1, -5, "soon", None]) | st.integers())},
    optional={"mmr": st.floats() | st.dictionaries(st.sampled_from(MODES), json_scalars) | json_values,
              "attrs": st.dictionaries(st.text(max_size=70), json_scalars, max_size=20) | json_values},
)
tokens = st.one_of(
    st.builds(_token, claims, usually(DEV_SECRET, st.text(min_size=1, max_size=40)),
              usually("HS256", st.sampled_from(["HS384", "HS512"]))),
    printable, st.text(max_size=300),
    st.sampled_from(["", "a.b.c", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "....", "a" * 5000]),
)
targets = st.one_of(
    st.just("/ws"),
    st.builds("{}{}{}".format,
              st.sampled_from(["", "//", "//[", "//[::1]", "http://h", "http://[x", "ws://h:99999", "*"]),
              st.sampled_from(["/ws", "/ws/", "/health", "/ready", "/", "/../ws", "", "/ws%00"]),
              st.sampled_from(["", "?token=", "?token=%ff%fe", "?token=a&token=b", "#x", "?" + "a&" * 3000])
              | tokens.map(lambda t: "?token=" + t)),
    printable.map(lambda t: "/" + t.replace(" ", "")) | st.text(max_size=60),
)
header_values = st.sampled_from(["websocket", "Upgrade", "13", "8", "", "dGhlIHNhbXBsZSBub25jZQ==",
                                 "keep-alive, Upgrade", "x" * 9000]) | printable | st.text(max_size=60)


@st.composite
def upgrade_requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    """An HTTP request as raw bytes, and whether it is complete (ends with a blank line)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=300)), False
    method = draw(usually("GET", st.sampled_from(["POST", "get", "GET GET", ""])))
    version = draw(usually("HTTP/1.1", st.sampled_from(["HTTP/1.0", "HTTP/2", "HTTP/1.1 x", ""])))
    headers = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    for name in draw(st.lists(st.sampled_from(sorted(headers)), max_size=2)):
        if draw(st.booleans()):
            headers.pop(name, None)
        else:
            headers[name] = draw(header_values)
    scheme = draw(usually("Bearer ", st.sampled_from(["bearer ", "Basic ", "", "Bearer  ", None])))
    if scheme is not None:
        headers["Authorization"] = scheme + draw(tokens)
    names = st.text(st.sampled_from(string.ascii_letters + "-"), min_size=1, max_size=20) | printable
    extra = draw(st.lists(st.tuples(names, printable | st.text(max_size=40)), max_size=2))
    lines = [f"{method} {draw(targets)} {version}", *(f"{k}: {v}" for k, v in headers.items()),
             *(f"{k}: {v}" for k, v in extra)]
    raw = "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n"
    return raw, True
