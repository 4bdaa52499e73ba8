"""The dirtier's fresh pattern: every pass rewrites each working-set page whole with new
pseudo-random data (so an XOR delta against the page's previous copy is the whole page, and
neither the page nor that delta compresses), and nothing outside the working set."""

from __future__ import annotations

import struct
import zlib

import pytest

from tests.helpers import wait_until
from vfmig.guests import _BOOT, DATA_GPA, PAGE_SIZE, PATTERNS, GuestParams
from vfmig.vm import MicroVM

WSS_PAGES = 64  # a fresh page costs this KVM ~3 ms of emulated instructions: a pass is ~0.2 s


def _words(page: bytes) -> list[int]:
    return list(struct.unpack(f"<{PAGE_SIZE // 8}Q", page))


def _changed_words(a: bytes, b: bytes) -> int:
    return sum(x != y for x, y in zip(_words(a), _words(b), strict=True))


def test_fresh_is_pattern_3_and_reads_the_clock_every_page_by_default() -> None:
    """The boot parameters carry enum vfmig_pattern's value, and clock_every 0 means the
    pattern's default: 1 for fresh (a page takes ~1000 increments' time), 256 otherwise."""
    assert PATTERNS["fresh"] == 3
    for params, pattern, every in [
        (GuestParams(pattern="fresh"), 3, 1),
        (GuestParams(pattern="sequential"), 0, 256),
        (GuestParams(pattern="fresh", clock_every=4), 3, 4),
    ]:
        params.validate(64 << 20)
        fields = _BOOT.unpack(params.pack(64 << 20))
        assert (fields[3], fields[7]) == (pattern, every), params


@pytest.mark.usefixtures("kvm")
def test_fresh_rewrites_whole_working_set_pages_and_nothing_else() -> None:
    wss = WSS_PAGES * PAGE_SIZE
    inside = [DATA_GPA, DATA_GPA + PAGE_SIZE, DATA_GPA + (WSS_PAGES - 1) * PAGE_SIZE]
    outside = DATA_GPA + wss  # the page right after the working set: an overrun lands here
    marker = bytes(range(256)) * (PAGE_SIZE // 256)
    with MicroVM(memory="64M", pattern="fresh", wss_bytes=wss) as vm:
        vm.core.write(outside, marker)
        vm.start()
        wait_until(lambda: vm.vcpu_stats()[0].passes >= 1, "the first fresh pass", timeout=60)
        vm.pause()
        before = [vm.core.read(gpa, PAGE_SIZE) for gpa in inside]
        passes = vm.vcpu_stats()[0].passes
        vm.resume()
        # Two more passes: every page is rewritten at least once between the two reads.
        wait_until(lambda: vm.vcpu_stats()[0].passes >= passes + 2, "two more fresh passes", timeout=60)
        vm.pause()
        after = [vm.core.read(gpa, PAGE_SIZE) for gpa in inside]
        beyond = vm.core.read(outside, PAGE_SIZE)
        assert vm.core.failed is None

    for gpa, a, b in zip(inside, before, after, strict=True):
        where = f"page {(gpa - DATA_GPA) // PAGE_SIZE} of the working set"
        # Whole page: all 512 words changed (two random words agree with chance 2^-64 each).
        assert _changed_words(a, b) >= PAGE_SIZE // 8 - 1, where
        # Fresh data: neither the page nor its XOR against the previous copy compresses.
        delta = bytes(x ^ y for x, y in zip(a, b, strict=True))
        for what, data in ((where, b), (f"the delta of {where}", delta)):
            assert len(zlib.compress(data, 9)) >= PAGE_SIZE, f"{what} compresses"
    # Seeded per page: neighbours in the same pass do not share their data.
    assert _changed_words(after[0], after[1]) >= PAGE_SIZE // 8 - 1
    assert beyond == marker, "the fresh pattern wrote past its working set"
