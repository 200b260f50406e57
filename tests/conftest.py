"""Shared pytest configuration: hypothesis profiles, and the ``launch_ranks`` fixture.

``ci`` (the default) is small and derandomised so runs are reproducible; ``dev`` searches harder.
Pick one with ``HYPOTHESIS_PROFILE=dev python -m pytest``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parents[1]

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=30,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def launch_ranks(tmp_path: Path) -> Callable[..., list[dict]]:
    """``launch_ranks(script_text, *args, n=2)``: run ``script_text`` as ``n`` processes ``script rank *args`` from
    the repository root (a ``torch.distributed`` group of gloo ranks, say), fail with a rank's stderr if any exits
    non-zero, and return each rank's last stdout line parsed as JSON. A rank left waiting in a collective times
    out after 120 s instead of hanging the suite."""

    def launch(script_text: str, *args: str, n: int = 2) -> list[dict]:
        script = tmp_path / "ranks.py"
        script.write_text(script_text)
        cmd = [sys.executable, str(script)]
        procs = [subprocess.Popen([*cmd, str(r), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=ROOT) for r in range(n)]  # fmt: skip
        try:
            results = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                p.kill()
        for p, (_, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err[-2000:]
        return [json.loads(out.strip().splitlines()[-1]) for out, _ in results]

    return launch
