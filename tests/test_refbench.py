"""The reference measurements the benchmarks divide by: they must measure what they say."""

from __future__ import annotations

import errno

from vfmig import _core


def test_the_ram_reference_moves_every_page_to_its_place() -> None:
    """RAM over loopback TCP: a figure only when every byte arrived at its offset (the C checks
    each page's marked byte); too little RAM to hold one page is refused, not measured."""
    assert _core.ref_tcp_loopback_ram(8 << 20) > 0
    assert _core.ref_tcp_loopback_ram(4095) == -errno.EINVAL


def test_parallel_streams_each_move_their_own_slice() -> None:
    """Streams split the RAM into slices (the last takes the remainder: 3 into 8 MiB + 1 page
    leaves one over); every page must still land in place, which fails if slices overlap or
    one is left out."""
    assert _core.ref_tcp_loopback_ram((8 << 20) + 4096, 3) > 0
    assert _core.ref_tcp_loopback_ram(8 << 20, 16) > 0
    for bad in (0, 17):
        assert _core.ref_tcp_loopback_ram(8 << 20, bad) == -errno.EINVAL
        assert _core.ref_tcp_loopback(8 << 20, bad) == -errno.EINVAL


def test_the_cache_hot_reference_measures_a_whole_stream() -> None:
    assert _core.ref_tcp_loopback(8 << 20) > 0
    assert _core.ref_tcp_loopback((8 << 20) + 5, 2) > 0  # an odd byte count still arrives whole
