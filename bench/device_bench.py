"""Device benchmark: what precopy of a VF's state saves in downtime, in one run on one machine.

A 256 MiB VM runs the vfdrv guest (the VF driver plus a throttled dirtier) with one simvf whose
wire offers 20,000 packets/s. It migrates to a second process with the device's PRE_COPY on and
off, for device states of 16 MiB and 64 MiB. The device's share of the downtime is the source's
device phase (STOP_COPY: reading and sending its stop-copy stream) plus the destination's device
load (RESUMING -> STOP: validate and apply), both from the engine's checkpoints. The figure is
the ratio off/on of that share, measured in the same run (median of REPS runs per setting).
Writes bench/results/device.json.

    .venv/bin/python bench/device_bench.py [--reps N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, write_results  # noqa: E402

from vfmig import _core  # noqa: E402
from vfmig.demo import start_destination  # noqa: E402
from vfmig.migration import MigrationOptions, migrate  # noqa: E402
from vfmig.migration.policy import Policy  # noqa: E402
from vfmig.vm import DeviceSpec, MicroVM  # noqa: E402

MEMORY = 256 << 20
STATES_MIB = (16, 64)
DMA_RATE = 20_000
GOAL = 5.0  # the goal: precopy cuts the device's share of the downtime at least 5x


def once(state_mib: int, precopy: bool) -> dict[str, float]:
    spec = DeviceSpec(state_bytes=state_mib << 20, dma_rate=DMA_RATE, precopy=precopy)
    with MicroVM(memory=MEMORY, guest="vfdrv", devices=(spec,), rate_pps=20_000, wss_bytes=32 << 20) as vm:
        dst, address = start_destination(run_seconds=0.3)
        try:
            vm.start()
            _settle(vm)
            r = migrate(vm, address, MigrationOptions(verify=True, policy=Policy(max_downtime_ms=300)))
        finally:
            dst.wait(60)
    if not r.verification.memory_match:
        raise RuntimeError(f"memory did not verify: {r.verification}")
    b, dev = r.downtime_breakdown, r.devices[0]
    if r.guest.packet_errors:
        raise RuntimeError(f"the guest saw {r.guest.packet_errors} bad packets")
    return {
        "downtime_ms": r.downtime_ms or 0.0,
        "device_share_ms": b.device_state_ms + b.dst_device_load_ms,
        "device_save_ms": b.device_state_ms,
        "device_load_ms": b.dst_device_load_ms,
        "stopcopy_bytes": dev.stopcopy_bytes,
        "precopy_bytes": dev.precopy_bytes,
        "packets_received": r.guest.packets_received,
    }


def _settle(vm: MicroVM) -> None:
    """The driver is up and the dirtier made a pass: the table is changing, packets flow."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        g = vm.core.simvf_guest_stats()
        up = _core.SIMVF_GUEST_STATES.get(g["state"]) == "running" and g["received"] > 0
        if up and all(s.passes >= 1 for s in vm.vcpu_stats()):
            break
        time.sleep(0.1)
    else:
        raise RuntimeError("the guest driver did not come up")
    time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, Any] = {}
    for mib in STATES_MIB:
        runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
        for rep in range(args.reps):
            for mode in ("on", "off"):  # interleaved, so drift hits both alike
                m = once(mib, mode == "on")
                runs[mode].append(m)
                print(
                    f"state {mib} MiB, precopy {mode}, run {rep + 1}: downtime {m['downtime_ms']:.1f} ms, "
                    f"device share {m['device_share_ms']:.2f} ms, stop-copy {m['stopcopy_bytes']:,} B",
                    flush=True,
                )
        med = {mode: {k: median([r[k] for r in rs]) for k in rs[0]} for mode, rs in runs.items()}
        results[f"{mib}M"] = {
            "precopy_on": med["on"],
            "precopy_off": med["off"],
            "device_share_ratio_off_vs_on": med["off"]["device_share_ms"] / med["on"]["device_share_ms"],
            "downtime_ratio_off_vs_on": med["off"]["downtime_ms"] / med["on"]["downtime_ms"],
            "runs": runs,
        }
    doc = {
        "memory_mib": MEMORY >> 20,
        "dma_rate_pps": DMA_RATE,
        "reps": args.reps,
        "goal_device_share_ratio": GOAL,
        "results": results,
    }
    path = write_results("device", doc)
    for k, r in results.items():
        print(
            f"{k}: device share off/on {r['device_share_ratio_off_vs_on']:.1f}x, "
            f"downtime off/on {r['downtime_ratio_off_vs_on']:.2f}x"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
