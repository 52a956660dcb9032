"""The original's and lightly's SwAV (step and Sinkhorn), which the benchmarks time swav_scale against.

They are the tests' own, tests/references.py, where they are checked against swav_scale, so that the code
timed is the code tested; this module puts tests/ on the path and hands them on.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[2] / "tests"
if str(TESTS) not in sys.path:
    sys.path.append(str(TESTS))

from references import LightlyStep, OriginalStep, lightly_sinkhorn, original_sinkhorn  # noqa: E402

__all__ = ["LightlyStep", "OriginalStep", "lightly_sinkhorn", "original_sinkhorn"]
