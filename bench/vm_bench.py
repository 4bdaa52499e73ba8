"""Micro-VM benchmark: the dirtier's maximum dirty rate and the pause latency, for 1 and 2 vCPUs.

References measured in the same run: QEMU 7.2 + KVM running the same guest image (dirty rate,
1 vCPU: multiboot starts only the BSP) and an eventfd ping-pong between two threads (pause
latency is one kick-and-park round per vCPU). Writes bench/results/vm.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_results  # noqa: E402
from qemu import Qemu, available  # noqa: E402

from vfmig import _core  # noqa: E402
from vfmig.guests import STATS_GPA  # noqa: E402
from vfmig.vm import MicroVM  # noqa: E402

MEMORY_MIB = 256
PAUSES = 50


def vfmig_run(vcpus: int) -> dict[str, float]:
    with MicroVM(memory=f"{MEMORY_MIB}M", vcpus=vcpus) as vm:
        vm.start()
        time.sleep(1.0)  # first pass populates RAM; measure steady state
        rate = vm.measure_rate(3.0)
        lat = []
        for _ in range(PAUSES):
            lat.append(vm.pause())
            vm.resume()
            time.sleep(0.005)
    return {"dirty_rate_pps": rate, "pause_ns_median": median(lat), "pause_ns_max": max(lat)}


def qemu_rate() -> float | None:
    if available():
        return None
    with Qemu(MEMORY_MIB) as q:
        q.wait_console("dirtier: running")
        time.sleep(1.0)
        t0, c0 = time.monotonic(), q.read_u64(STATS_GPA)
        time.sleep(3.0)
        t1, c1 = time.monotonic(), q.read_u64(STATS_GPA)
    return (c1 - c0) / (t1 - t0)


def main() -> None:
    rtt = _core.ref_eventfd_rtt(50_000)
    qrate = qemu_rate()
    rows = {}
    for vcpus in (1, 2):
        r = vfmig_run(vcpus)
        r["pause_vs_eventfd_rtt"] = r["pause_ns_median"] / rtt
        if qrate:
            r["dirty_rate_vs_qemu_1vcpu"] = r["dirty_rate_pps"] / qrate
        rows[f"{vcpus}vcpu"] = r
        print(
            f"{vcpus} vCPU: {r['dirty_rate_pps']:,.0f} pages/s, "
            f"pause median {r['pause_ns_median'] / 1e3:.1f} us "
            f"(max {r['pause_ns_max'] / 1e3:.1f} us, {r['pause_vs_eventfd_rtt']:.1f}x eventfd RTT)"
        )
    print(f"references: eventfd RTT {rtt / 1e3:.1f} us, QEMU dirty rate {qrate or 0:,.0f} pages/s")
    path = write_results(
        "vm",
        {
            "memory_mib": MEMORY_MIB,
            "reference": {"eventfd_rtt_ns": rtt, "qemu_dirty_rate_pps": qrate},
            "results": rows,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
