"""Shared test set-up: hypothesis profile and a record of the largest errors seen."""

from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
from hypothesis import settings

settings.register_profile("default", deadline=None, print_blob=True)
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(min(2, torch.get_num_threads()))

_MAX_ERROR: dict[str, float] = defaultdict(float)
_CASES: dict[str, int] = defaultdict(int)


@pytest.fixture(scope="session")
def record_error():
    """``record_error(label, ours, theirs)``: keeps the largest |ours - theirs| per label."""

    def record(label: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        err = (ours.detach().double() - theirs.detach().double()).abs()
        finite = err[torch.isfinite(err)]
        worst = float(finite.max()) if finite.numel() else 0.0
        _MAX_ERROR[label] = max(_MAX_ERROR[label], worst)

    return record


@pytest.fixture(scope="session")
def count_case():
    """``count_case(label)``: counts the configurations a differential test ran."""

    def count(label: str) -> None:
        _CASES[label] += 1

    return count


def pytest_terminal_summary(terminalreporter):
    if not _MAX_ERROR and not _CASES:
        return
    terminalreporter.section("differential summary")
    for label, count in sorted(_CASES.items()):
        terminalreporter.write_line(f"{label}: {count} configurations")
    for label, worst in sorted(_MAX_ERROR.items()):
        terminalreporter.write_line(f"{label}: max |ours - oracle| = {worst:.3e}")


# Figures in the tests and the README's blocks are drawn off screen.
os.environ.setdefault("MPLBACKEND", "Agg")
