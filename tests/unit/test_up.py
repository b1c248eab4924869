from __future__ import annotations

import os
from pathlib import Path

from tandem.up import _memory_for_redis

PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_redis_gets_half_the_machine_s_memory_without_a_container_limit(tmp_path: Path) -> None:
    assert _memory_for_redis((tmp_path / "absent",)) == PHYSICAL // 2
    unlimited = tmp_path / "memory.max"
    unlimited.write_text("max\n")
    unlimited_v1 = tmp_path / "memory.limit_in_bytes"
    unlimited_v1.write_text("9223372036854771712\n")
    assert _memory_for_redis((unlimited, unlimited_v1)) == PHYSICAL // 2


def test_redis_gets_half_the_container_s_memory(tmp_path: Path) -> None:
    limit = tmp_path / "memory.max"
    limit.write_text(f"{2 * 1024**3}\n")
    assert _memory_for_redis((limit, tmp_path / "absent")) == min(PHYSICAL, 2 * 1024**3) // 2


def test_redis_gets_half_a_cgroup_v1_container_s_memory(tmp_path: Path) -> None:
    limit = tmp_path / "memory.limit_in_bytes"
    limit.write_text(f"{1024**3}\n")
    assert _memory_for_redis((tmp_path / "absent", limit)) == min(PHYSICAL, 1024**3) // 2
