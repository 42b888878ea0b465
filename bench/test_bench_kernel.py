"""Hot-path benchmarks: decode a candidate snapshot and pair it, extension versus twin.

    make bench                                   # run, print the DESIGN.md targets
    make bench PYTEST_ARGS="--benchmark-autosave"          # save as the new baseline
    make bench PYTEST_ARGS="--benchmark-compare --benchmark-compare-fail=min:10%"  # gate
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

import pytest

from server.matching import kernel
from server.protocol import codec
from server.protocol.messages import StartLoading

NOW = 1_800_000_000_000
IMPLS = kernel.implementations()
MODES = {"1v1": (1, 2), "5v5": (5, 2)}


def snapshot(size: int, seed: int = 7, full_precision: bool = False) -> list[bytes | None]:
    """Tickets as Redis returns them: queue order, created in that order (as hiredis does).

    Ratings are whole MMR numbers (N(1500, 300)), as rating services issue them and as the
    enqueue script stores them ("1523.0"); ``full_precision`` gives 17-digit floats instead,
    which take the slower strtod path of the decoder.
    """
    rng = random.Random(seed)
    rows = sorted((NOW - rng.randint(0, 120_000), rng.gauss(1500, 300)) for _ in range(size))
    return [
        f"{rating if full_precision else float(round(rating))!r}|{queued}|{{\"region\":\"eu\"}}".encode()
        for queued, rating in rows
    ]


def decode_and_pair(impl: ModuleType, tickets: list[bytes | None], team_size: int, teams: int) -> Any:
    _, ratings, queued, _ = impl.decode_tickets(tickets)
    return impl.pair(ratings, queued, NOW, team_size, teams, 50.0, 25.0, 400.0, 60_000)


@pytest.mark.parametrize("size", [1_000, 10_000, 100_000])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_decode_and_pair(benchmark: Any, results: dict[tuple[str, int, str], float],
                         impl: str, mode: str, size: int) -> None:
    tickets = snapshot(size)
    team_size, teams = MODES[mode]
    rounds = 3 if impl == "python" and size == 100_000 else None
    if rounds:
        out = benchmark.pedantic(decode_and_pair, (IMPLS[impl], tickets, team_size, teams),
                                 rounds=rounds, iterations=1)
    else:
        out = benchmark(decode_and_pair, IMPLS[impl], tickets, team_size, teams)
    assert len(out) > size // 2  # most of a dense pool is matched
    results[(mode, size, impl)] = benchmark.stats.stats.min


@pytest.mark.parametrize("full_precision", [False, True], ids=["whole", "17-digit"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_decode_only_100k(benchmark: Any, impl: str, full_precision: bool) -> None:
    tickets = snapshot(100_000, full_precision=full_precision)
    index, _, _, bad = benchmark(IMPLS[impl].decode_tickets, tickets)
    assert len(index) == 100_000 and bad == []


def test_codec_decode_enqueue(benchmark: Any) -> None:
    frame = '{"type":"enqueue","game_mode":"5v5","request_id":"r-123456"}'
    assert benchmark(codec.decode, frame).game_mode == "5v5"


def test_codec_encode_start_loading(benchmark: Any) -> None:
    message = StartLoading(loading_session_id="12.3456.7", game_mode="5v5",
                           teams=[[f"player-{i}" for i in range(5)], [f"player-{i}" for i in range(5, 10)]],
                           deadline_ms=NOW)
    assert benchmark(codec.encode, message).startswith(b'{"type":"start_loading"')
