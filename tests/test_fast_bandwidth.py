"""The memory-bandwidth floor used by the benchmark rows of the fast path."""

import math

import pytest

from jaxgrad.bench.bandwidth import write_bandwidth_bound


def test_write_bandwidth_bound_is_a_positive_time():
    small = write_bandwidth_bound(4096, repeats=3)
    assert 0 < small < 1 and math.isfinite(small)


@pytest.mark.parametrize("num_bytes", [0, -4, 1.5, True])
def test_bad_num_bytes(num_bytes):
    with pytest.raises(ValueError, match="`num_bytes` must be a positive integer"):
        write_bandwidth_bound(num_bytes)


def test_bad_repeats():
    with pytest.raises(ValueError, match="`repeats` must be a positive integer"):
        write_bandwidth_bound(64, repeats=0)
