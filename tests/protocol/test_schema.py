"""docs/schema/*.json is what the msgspec types generate, and it describes real frames."""

from __future__ import annotations

import json
from pathlib import Path

from server.protocol import codec, schema
from server.protocol.messages import Enqueued, Error, MatchFound, Welcome


def test_committed_schema_matches_the_msgspec_types() -> None:
    for name in schema.DOCUMENTS:
        committed = (schema.DEFAULT_DIR / name).read_text()
        assert committed == schema.render(name), (
            f"docs/schema/{name} is stale: run `python -m server.protocol.schema`")


def test_check_mode_notices_a_stale_file(tmp_path: Path) -> None:
    assert schema.main(["--dir", str(tmp_path)]) == 0
    assert schema.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "server-messages.schema.json").write_text("{}\n")
    assert schema.main(["--check", "--dir", str(tmp_path)]) == 1


def test_every_message_type_is_in_its_schema() -> None:
    server = json.loads(schema.render("server-messages.schema.json"))
    tags = set(server["discriminator"]["mapping"])
    assert tags == {"welcome", "enqueued", "dequeued", "start_loading", "match_found", "requeued",
                    "queue_status", "error"}
    client = json.loads(schema.render("client-messages.schema.json"))
    assert set(client["discriminator"]["mapping"]) == {"enqueue", "dequeue", "loading_complete", "status"}
    game = json.loads(schema.render("game-server-messages.schema.json"))
    assert set(game["discriminator"]["mapping"]) == {"battle_request", "battle_assigned", "battle_rejected"}
    # Required fields of the schema are exactly what the server always sends.
    welcome = json.loads(codec.encode(Welcome(player_id="p", state="idle", protocol=1)))
    assert set(server["$defs"]["Welcome"]["required"]) == set(welcome)
    for message in (Enqueued(game_mode="1v1", queued_at_ms=1), Error(code="x", message="m"),
                    MatchFound(loading_session_id="m", game_mode="1v1", server_address="a",
                               server_session_id="s", teams=[["p"]])):
        sent = json.loads(codec.encode(message))
        assert set(server["$defs"][type(message).__name__]["required"]) == set(sent)
