"""Shared pytest configuration: hypothesis profiles.

``ci`` (the default) is small and derandomised so runs are reproducible; ``dev`` searches harder.
Pick one with ``HYPOTHESIS_PROFILE=dev python -m pytest``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=30,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
