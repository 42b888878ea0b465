"""Locate and load the Lua scripts in ``lua/`` (one file per script, named by verb)."""

from __future__ import annotations

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


def read_scripts(directory: Path | None = None) -> dict[str, str]:
    folder = directory or lua_dir()
    return {path.stem: path.read_text(encoding="utf-8") for path in sorted(folder.glob("*.lua"))}
