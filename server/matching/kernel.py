"""Pick the compiled kernel when it is built, else the pure-Python twin (aiohttp's pattern).

``FASTMATCH_NO_EXTENSIONS=1`` at build time leaves the extension unbuilt; tests and benchmarks
compare both (``implementations``, ``pool_cores``). Two kernels: the pairing kernel
(``kernel_py``) and the leader's pool of candidates (``pool_py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Final

from server.matching import kernel_py, pool_py

log = logging.getLogger(__name__)

python_kernel: Final[ModuleType] = kernel_py
compiled_kernel: ModuleType | None
try:
    import _fastmatch.kernel as _compiled

    compiled_kernel = _compiled
except ImportError:  # not built: no compiler, or FASTMATCH_NO_EXTENSIONS=1
    compiled_kernel = None
    log.warning("_fastmatch extension not available; using the pure-Python twin")

compiled_pool: type[pool_py.PoolCore] | None
try:
    from _fastmatch.pool import PoolCore as _CompiledPool

    compiled_pool = _CompiledPool
except ImportError:
    compiled_pool = None

active: ModuleType = compiled_kernel or python_kernel
decode_tickets: Callable[[list[bytes | None]], kernel_py.Decoded] = active.decode_tickets
PoolCore: type[pool_py.PoolCore] = compiled_pool or pool_py.PoolCore


def implementations() -> dict[str, ModuleType]:
    """Every implementation available here, by name (for tests and benchmarks)."""
    found = {"python": python_kernel}
    if compiled_kernel is not None:
        found["cython"] = compiled_kernel
    return found


def pool_cores() -> dict[str, type[pool_py.PoolCore]]:
    """Every pool implementation available here, by name (for tests and benchmarks)."""
    found = {"python": pool_py.PoolCore}
    if compiled_pool is not None:
        found["cython"] = compiled_pool
    return found
