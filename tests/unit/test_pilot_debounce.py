"""A burst of registry changes becomes one push; a steady trickle still pushes within the
maximum delay."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shoal.pilot.server import Pilot, Settings


def run_burst(tmp_path: Path, changes: int, spacing: float, debounce: float = 0.05) -> int:
    settings = Settings(config_dir=str(tmp_path), debounce=debounce, max_delay=0.3)

    async def burst() -> int:
        pilot = Pilot(settings, [])
        for _ in range(changes):
            pilot.changed()
            await asyncio.sleep(spacing)
        await asyncio.sleep(debounce * 3)
        return pilot.pushes

    return asyncio.run(burst())


def test_a_burst_is_one_push(tmp_path: Path) -> None:
    assert run_burst(tmp_path, changes=50, spacing=0.001) == 1


def test_a_steady_trickle_pushes_at_the_maximum_delay(tmp_path: Path) -> None:
    # a change every 20 ms never leaves 50 ms of quiet: pushes come from max_delay (0.3 s)
    pushes = run_burst(tmp_path, changes=50, spacing=0.02)
    assert 2 <= pushes <= 6
