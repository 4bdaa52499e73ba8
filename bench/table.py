"""Render bench/results/*.json as the README's results table (between the results markers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB/s"


def render() -> str:
    rows = ["| benchmark | vfmig | reference (same run) | ratio |", "|---|---|---|---|"]
    vm_path, mig_path = RESULTS / "vm.json", RESULTS / "migrate.json"
    if vm_path.exists():
        vm = json.loads(vm_path.read_text())
        ref = vm["reference"]
        for key, r in vm["results"].items():
            if ref.get("qemu_dirty_rate_pps"):
                rows.append(
                    f"| dirtier max rate, {key} | {r['dirty_rate_pps']:,.0f} pages/s | "
                    f"QEMU+KVM, same guest, 1 vCPU: {ref['qemu_dirty_rate_pps']:,.0f} pages/s | "
                    f"{r['dirty_rate_vs_qemu_1vcpu']:.2f}x |"
                )
            rows.append(
                f"| pause latency (median), {key} | {r['pause_ns_median'] / 1e3:.1f} us | "
                f"eventfd ping-pong RTT: {ref['eventfd_rtt_ns'] / 1e3:.1f} us | {r['pause_vs_eventfd_rtt']:.2f}x |"
            )
    if mig_path.exists():
        mig = json.loads(mig_path.read_text())
        tcp = mig["reference"]["tcp_loopback_Bps"]
        mib = mig["memory_mib"]
        for name, r in mig["results"].items():
            v, q = r["vfmig"], r.get("qemu")
            rows.append(
                f"| migrate {mib} MiB {name}: throughput | {_gb(v['throughput_Bps'])} | "
                f"loopback TCP, one stream: {_gb(tcp)} | {r['vfmig_vs_tcp']:.2f}x (median of per-run ratios) |"
            )
            if q:
                rows.append(
                    f"| migrate {mib} MiB {name}: throughput | {_gb(v['throughput_Bps'])} | "
                    f"QEMU 7.2: {_gb(q['throughput_Bps'])} | {r['vfmig_vs_qemu_throughput']:.2f}x |"
                )
                rows.append(
                    f"| migrate {mib} MiB {name}: downtime | {v['downtime_ms']:.1f} ms | "
                    f"QEMU 7.2: {q['downtime_ms']:.1f} ms | {r['vfmig_vs_qemu_downtime']:.2f}x |"
                )
    return "\n".join(rows)


def update_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{BEGIN}\n{render()}\n{END}"
    text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(text)


if __name__ == "__main__":
    update_readme()
    print(render())
