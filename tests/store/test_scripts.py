"""The Lua loader: shared helpers spliced in, and mistakes refused at load time."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import ConfigError
from server.store.scripts import read_scripts


def _write(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_includes_are_spliced(tmp_path: Path) -> None:
    _write(tmp_path, "include/clock.lua", "local function now_ms() return 1 end\n")
    _write(tmp_path, "a.lua", "-- header\n--#include clock\nreturn now_ms()\n")
    spliced = "-- header\nlocal function now_ms() return 1 end\n\nreturn now_ms()\n"
    assert read_scripts(tmp_path) == {"a": spliced}


@pytest.mark.parametrize(("text", "why"), [
    ("--#include nope\nreturn 1\n", "missing"),
    ("if x then\n  --#include clock\nend\n", "column 0"),
])
def test_bad_includes_are_refused(tmp_path: Path, text: str, why: str) -> None:
    _write(tmp_path, "include/clock.lua", "local function now_ms() return 1 end\n")
    _write(tmp_path, "a.lua", text)
    with pytest.raises(ConfigError, match=why):
        read_scripts(tmp_path)


def test_the_shipped_scripts_load_with_their_helpers() -> None:
    scripts = read_scripts()
    for name, source in scripts.items():
        if "now_ms()" in source:
            assert "local function now_ms()" in source, name
        if "notify(" in source:
            assert "local function notify(" in source, name
