"""The order mapping's work grows linearly with the segments of a message (docs/reliability.md, HL7 mapping).

A message of 100k NTEs (2.3 MB) once took 44.5 s to map, because each segment after an ORC copied the
group's tuple of segments so far. The CPU time of this thread is compared between two sizes of the same
message, never against a bound of its own: other processes on a loaded machine take no CPU time of it.
"""

import gc
import time

import pytest

from mappings.orders import map_message
from mappings.v2 import Message, parse
from tests.hl7_golden import OMI

SMALL, LARGE = 25_000, 100_000


def _with_ntes(count: int) -> Message:
    """The dcm4che OMI^O23 with ``count`` order notes (NTE after its OBR)."""
    head, obx = OMI.split(b"\rOBX|1|", 1)
    ntes = b"".join(b"\rNTE|%d||note %d" % (i, i) for i in range(count))
    return parse(head + ntes + b"\rOBX|1|" + obx, max_segments=count + 100)  # past the intake's default


def _fastest_map(msg: Message, runs: int = 3) -> float:
    """The best of a few runs, the collector paused: the CPU time the mapping itself needs."""
    best = float("inf")
    gc.disable()
    try:
        for _ in range(runs):
            start = time.thread_time()
            map_message(msg)
            best = min(best, time.thread_time() - start)
    finally:
        gc.enable()
    return best


@pytest.mark.slow
def test_mapping_time_grows_linearly_with_the_segments():
    small, large = _with_ntes(SMALL), _with_ntes(LARGE)
    bundle = map_message(large)
    (order,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    assert len(order["note"]) >= LARGE  # every NTE was read, not skipped
    ratio = _fastest_map(large) / _fastest_map(small)
    # 4x the segments: linear work takes about 4x the time, quadratic work 16x.
    assert ratio < 10, f"{LARGE} NTEs took {ratio:.1f}x the time of {SMALL}"
