"""JSON Schema of every wire message, generated from the msgspec Structs (docs/schema/).

    python -m server.protocol.schema            # rewrite docs/schema/*.json
    python -m server.protocol.schema --check    # exit 1 if the committed files differ

The Structs in ``messages.py`` and ``gameserver.py`` are the one definition of the wire format;
these files are derived from them for client authors (and the TypeScript client's types are
generated from these files), and a test fails when they drift.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Final

import msgspec

from server.protocol import gameserver
from server.protocol.messages import PROTOCOL_VERSION, ClientMessage, ServerMessage

DEFAULT_DIR: Final = Path(__file__).resolve().parents[2] / "docs" / "schema"
_BASE_ID: Final = "https://fastmatch.invalid/schema/"

# file name -> (title, description, the tagged union it describes)
DOCUMENTS: Final[dict[str, tuple[str, str, Any]]] = {
    "client-messages.schema.json": (
        "fastmatch client -> server messages",
        "One JSON text frame per message, sent by a game client on /ws (docs/protocol.md section 3).",
        ClientMessage,
    ),
    "server-messages.schema.json": (
        "fastmatch server -> client messages",
        "One JSON text frame per message, sent by fastmatch to a game client (docs/protocol.md "
        "section 4). Optional fields are omitted when unset.",
        ServerMessage,
    ),
    "game-server-messages.schema.json": (
        "fastmatch <-> game server messages over Redis pub/sub",
        "battle_request is published by fastmatch; a game server answers on reply_to with "
        "battle_assigned or battle_rejected (docs/protocol.md section 9).",
        gameserver.BattleRequest | gameserver.BattleReply,
    ),
}


def document(name: str) -> dict[str, Any]:
    title, description, union = DOCUMENTS[name]
    (root,), defs = msgspec.json.schema_components([union], ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": _BASE_ID + name,
        "title": title,
        "description": description,
        "x-fastmatch-protocol": PROTOCOL_VERSION,
        **root,
        "$defs": defs,
    }


def render(name: str) -> str:
    return json.dumps(_cleaned(document(name)), indent=2) + "\n"


def _cleaned(node: Any) -> Any:
    """Descriptions (the Structs' docstrings) as ``inspect.cleandoc`` leaves them: msgspec
    0.23 keeps their indentation, earlier releases strip it, and the files must not depend on
    which one is installed."""
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str) else _cleaned(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_cleaned(v) for v in node]
    return node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.protocol.schema",
                                     description="Write or check docs/schema/*.json.")
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name in DOCUMENTS:
        path: Path = args.dir / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    for stale_path in stale:
        print(f"{stale_path} differs from the msgspec types; run `python -m server.protocol.schema`",
              file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
