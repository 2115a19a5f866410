from __future__ import annotations

import os
import sys
import time

import pytest

from weft.testing import burn


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_burners_use_cpu_while_the_block_runs_and_are_gone_after() -> None:
    with burn.burning(1, limit_s=60) as pids:
        assert len(pids) == 1
        start = _cpu_ticks(pids[0])
        deadline = time.monotonic() + 30  # a second of CPU time within 30 s, even on a busy machine
        while _cpu_ticks(pids[0]) - start < os.sysconf("SC_CLK_TCK") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _cpu_ticks(pids[0]) - start >= os.sysconf("SC_CLK_TCK")
    assert not os.path.exists(f"/proc/{pids[0]}"), "the burner outlived its block"


def test_main_returns_the_command_status() -> None:
    assert burn.main(["--burners", "0", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert burn.main(["--burners", "1", "--", sys.executable, "-c", "pass"]) == 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="burners"), burn.burning(-1):
        pass
    with pytest.raises(SystemExit) as exc:
        burn.main(["--burners", "0"])
    assert exc.value.code == 2
