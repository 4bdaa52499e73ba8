"""The reference measurements the benchmarks divide by: they must measure what they say."""

from __future__ import annotations

import errno

from vfmig import _core


def test_the_ram_reference_moves_every_page_to_its_place() -> None:
    """RAM over loopback TCP: a figure only when every byte arrived at its offset (the C checks
    each page's marked byte); too little RAM to hold one page is refused, not measured."""
    assert _core.ref_tcp_loopback_ram(8 << 20) > 0
    assert _core.ref_tcp_loopback_ram(4095) == -errno.EINVAL


def test_the_cache_hot_reference_measures_a_whole_stream() -> None:
    assert _core.ref_tcp_loopback(8 << 20) > 0
