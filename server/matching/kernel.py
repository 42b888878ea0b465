"""Pick the compiled kernel when it is built, else the pure-Python twin (aiohttp's pattern).

``FASTMATCH_NO_EXTENSIONS=1`` at build time leaves the extension unbuilt; ``use_python()``
forces the twin at run time (tests and benchmarks compare both).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Final

from server.matching import kernel_py

log = logging.getLogger(__name__)

python_kernel: Final[ModuleType] = kernel_py
compiled_kernel: ModuleType | None
try:
    import _fastmatch.kernel as _compiled

    compiled_kernel = _compiled
except ImportError:  # not built: no compiler, or FASTMATCH_NO_EXTENSIONS=1
    compiled_kernel = None
    log.warning("_fastmatch extension not available; using the pure-Python twin")

active: ModuleType = compiled_kernel or python_kernel
decode_tickets: Callable[[list[bytes | None]], kernel_py.Decoded] = active.decode_tickets


def implementations() -> dict[str, ModuleType]:
    """Every implementation available here, by name (for tests and benchmarks)."""
    found = {"python": python_kernel}
    if compiled_kernel is not None:
        found["cython"] = compiled_kernel
    return found
