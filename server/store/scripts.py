"""Locate and load the Lua scripts in ``lua/`` (one file per script, named by verb)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from server.errors import ConfigError


def lua_dir() -> Path:
    """The source checkout's ``lua/`` first, then the copy installed under ``share/``."""
    candidates = [
        Path(__file__).resolve().parents[2] / "lua",
        Path(sys.prefix) / "share" / "fastmatch" / "lua",
    ]
    for candidate in candidates:
        if (candidate / "enqueue.lua").is_file():
            return candidate
    raise ConfigError(f"Lua scripts not found in any of: {', '.join(map(str, candidates))}")


_INCLUDE = re.compile(r"^--#include (\w+)$", re.MULTILINE)
_LEFTOVER = re.compile(r"^\s*--#include", re.MULTILINE)


def read_scripts(directory: Path | None = None) -> dict[str, str]:
    """Every ``lua/*.lua`` by name, with ``--#include name`` lines replaced by
    ``lua/include/name.lua`` (Redis scripts cannot import; shared helpers live once)."""
    folder = directory or lua_dir()

    def include(match: re.Match[str]) -> str:
        path = folder / "include" / f"{match.group(1)}.lua"
        if not path.is_file():
            raise ConfigError(f"{path}: included by a script but missing")
        return path.read_text(encoding="utf-8")

    scripts = {path.stem: _INCLUDE.sub(include, path.read_text(encoding="utf-8"))
               for path in sorted(folder.glob("*.lua"))}
    for name, source in scripts.items():
        # An include the pattern missed (indented, misspelt) would stay a silent Lua comment.
        if _LEFTOVER.search(source):
            raise ConfigError(f"lua/{name}.lua: an --#include must stand alone at column 0")
    return scripts
