"""Shared test configuration: hypothesis profiles and the offline switch for Hugging Face libraries."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Tests never touch the network: tiny models are built from configs, nothing is downloaded.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

settings.register_profile(
    "default", deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow]
)
# CI: no example database, derandomised so a red run replays identically.
settings.register_profile(
    "ci", deadline=None, max_examples=50, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
# Before a release: HYPOTHESIS_PROFILE=thorough searches forty times as many examples.
settings.register_profile(
    "thorough", deadline=None, max_examples=2000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): tiny
    models run fastest on one thread, and do not fight xdist's other worker for the 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
