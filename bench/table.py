"""Render bench/results/*.json as the README's results table (between the results markers)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from common import ref_bps_key

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
    dev_path = RESULTS / "device.json"
    if dev_path.exists():
        dev = json.loads(dev_path.read_text())
        for size, r in dev["results"].items():
            on, off = r["precopy_on"], r["precopy_off"]
            rows.append(
                f"| VF state {size}: device share of downtime, precopy on | {on['device_share_ms']:.2f} ms "
                f"(downtime {on['downtime_ms']:.1f} ms) | precopy off: {off['device_share_ms']:.2f} ms "
                f"(downtime {off['downtime_ms']:.1f} ms) | {r['device_share_ratio_off_vs_on']:.1f}x less |"
            )
    return "\n".join(rows)


RELIABILITY_BEGIN, RELIABILITY_END = "<!-- reliability:begin -->", "<!-- reliability:end -->"


def render_reliability() -> str:
    """bench/results/reliability.json (fault matrix, refusals, soak) and fuzz.json as a table."""
    path = RESULTS / "reliability.json"
    if not path.exists():
        return "(no reliability results yet: run bench/reliability_bench.py)"
    r = json.loads(path.read_text())
    rows = ["| measure | result |", "|---|---|"]
    rows.append(f"| fault matrix: cases survived / tried | {r['cases_survived']} / {r['cases_tried']} |")
    if r.get("fuzz_execs") is not None:
        rows.append(f"| fuzzing: executions (all harnesses) / crashes | {r['fuzz_execs']:,} / {r['fuzz_crashes']} |")
    if r.get("refused_unauthenticated") is not None:
        tried = (r.get("unauthenticated_run") or {}).get("attempts", "?")
        rows.append(f"| unauthenticated or stray connections refused | {r['refused_unauthenticated']} of {tried} |")
    if r.get("soak_migrations") is not None:
        soak = f"{r['soak_migrations']} / {r['soak_mismatches']}"
        rows.append(f"| soak: verified migrations / memory mismatches | {soak} |")
        if r.get("soak_packet_errors") is not None:
            vm = (r.get("soak") or {}).get("vm", "")
            rows.append(f"| soak: packet errors the guest's VF driver saw ({vm}) | {r['soak_packet_errors']} |")
        rows.append(
            f"| soak: growth from first to last migration | {r['fd_growth']} fds, {r['thread_growth']} threads, "
            f"{r['rss_growth_kib']:,} KiB RSS |"
        )
    return "\n".join(rows)


PROBES_BEGIN, PROBES_END = "<!-- probes:begin -->", "<!-- probes:end -->"


def _ms(s: dict[str, float] | None, sign: bool = False) -> str:
    """A bench/probes_bench.py summary ({median, min, max, n}) as 'median (min to max)'."""
    if not s:
        return "none"
    f = "{:+.1f}" if sign else "{:.1f}"
    return f"{f.format(s['median'])} ms ({f.format(s['min'])} to {f.format(s['max'])}, n={s['n']})"


def render_probes(path: Path | None = None) -> str:
    """bench/results/probes.json (bench/probes_bench.py) as a table: the downtime QEMU reports
    against the one the kernel saw and the guest's clock saw, and what the probes cost vfmig."""
    path = path or RESULTS / "probes.json"
    if not path.exists():
        return "(no probe results yet: run bench/probes_bench.py)"
    r = json.loads(path.read_text())
    rows = ["| measure | result (median, range) |", "|---|---|"]
    q = r.get("qemu")
    if q:
        run = f"QEMU 7.2, {q['memory_mib']} MiB dirtier, {q['reps']} migrations"
        rows.append(f"| {run}: downtime QEMU reports (query-migrate) | {_ms(q['qemu_downtime_ms'])} |")
        rows.append(
            f"| {run}: downtime the kernel saw (BPF: source's last guest exit to destination's first entry) | "
            f"{_ms(q['bpf_downtime_ms'])} |"
        )
        rows.append(f"| {run}: kernel minus QEMU, per run | {_ms(q['bpf_minus_qemu_ms'], sign=True)} |")
        for clock, g in q["guest"].items():
            if g["max_gap_ms"]:
                rows.append(f"| {run}: largest gap the guest's clock saw ({clock}) | {_ms(g['max_gap_ms'])} |")
        if q.get("guest_finding"):
            finding = q["guest_finding"].replace("|", "\\|")
            rows.append(f"| what the guest's clock sees under QEMU | {finding} |")
    elif r.get("qemu_skipped"):
        rows.append(f"| QEMU runs | skipped: {r['qemu_skipped']} |")
    o = r.get("overhead")
    if o:
        run = f"vfmig {o['memory_mib']} MiB dirtier, with / without probes ({o['pairs']} alternating pairs)"
        tp = ", ".join(f"{x:.2f}" for x in o["throughput_ratio_runs"])
        rows.append(f"| {run}: throughput | {o['throughput_ratio']:.3f}x (pairs: {tp}) |")
        if o["downtime_ratio"] is not None:
            dt = ", ".join(f"{x:.2f}" for x in o["downtime_ratio_runs"])
            rows.append(f"| {run}: downtime | {o['downtime_ratio']:.3f}x (pairs: {dt}) |")
        if o.get("probe_cpu_ms") is not None:
            rows.append(
                f"| {run}: the probes' own CPU time per migration | {o['probe_cpu_ms']:.1f} ms "
                f"({o['probe_cpu_share_pct']:.2f}% of the CPUs while attached) |"
            )
    return "\n".join(rows)


CONVERGE_BEGIN, CONVERGE_END = "<!-- converge:begin -->", "<!-- converge:end -->"


def _vfmig_cell(r: dict[str, Any]) -> str:
    """One vfmig run of bench/converge_bench.py: total time, both downtimes, whether it held."""
    if "skipped" in r:
        return f"skipped: {r['skipped']}".replace("|", "\\|")
    if not r.get("completed"):
        return f"{r.get('status') or 'failed'}: {r.get('error', '')}".rstrip(": ").replace("|", "\\|")
    guest = r.get("guest_observed_downtime_ms")
    seen = f"{r['downtime_ms']:.1f} ms" + (f" (guest {guest:.1f} ms)" if guest is not None else "")
    remedies = ", ".join(dict.fromkeys(str(m.get("remedy")) for m in r.get("remedies", [])))
    held = "held" if r["held"] else "**not held**"
    return f"{r['total_time_ms'] / 1e3:.2f} s, downtime {seen}, {held}" + (f"; {remedies}" if remedies else "")


def _qemu_cell(case: dict[str, Any], timeout: float) -> str:
    """QEMU's fastest configuration that held the limit, or what became of them all."""
    runs = {n: r for n, r in case["runs"].items() if n.startswith("qemu")}
    best = case.get("qemu_best")
    if best:
        r = runs[best]
        return f"{best}: {r['total_time_ms'] / 1e3:.2f} s, downtime {r['downtime_ms']:.0f} ms"
    tried = [n for n, r in runs.items() if "skipped" not in r]
    if not tried:
        return "not run: " + "; ".join(sorted({str(r.get("skipped")) for r in runs.values()})).replace("|", "\\|")
    return f"none held ({', '.join(tried)}; cancelled after {timeout:g} s or over the limit)"


def render_converge(path: Path | None = None) -> str:
    """bench/results/converge.json (bench/converge_bench.py) as a table: per row, limit and link,
    vfmig against QEMU 7.2's fastest configuration that held the limit, and the idle row."""
    path = path or RESULTS / "converge.json"
    if not path.exists():
        return "(no convergence results yet: run bench/converge_bench.py)"
    r = json.loads(path.read_text())
    timeout, goal = r["qemu_timeout_s"], r["goal_speedup"]
    rows = [
        f"| workload (1 GiB guest) | limit, link | vfmig | QEMU 7.2, fastest that held the limit | "
        f"speedup | goal (held, >= {goal:g}x) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"].values():
        for case in row["cases"].values():
            v = case["runs"].get(case["vfmig_config"], {})
            if case.get("speedup") is not None:
                speedup = f"{case['speedup']:.1f}x"
            elif case.get("speedup_lower_bound") is not None:
                speedup = f">= {case['speedup_lower_bound']:.1f}x"
            else:
                speedup = "-"
            met = {True: "yes", False: "**no**", None: "not measured"}[case.get("goal_met")]
            if case.get("goal_reachable") is False:
                met += f" (out of reach: {goal:g}x would be under the {case['floor_ms']:.0f} ms floor)"
            link = "1 Gbit/s" if case["link"] == "1gbit" else "unlimited"
            rows.append(
                f"| dirtier, {row['pattern']}, {row['wss_mib']} MiB | {case['limit_ms']:g} ms, {link} | "
                f"{case['vfmig_config']}: {_vfmig_cell(v)} | {_qemu_cell(case, timeout)} | {speedup} | {met} |"
            )
            for vname, vr in case["runs"].items():  # the other vfmig configurations (compression)
                if vname.startswith("vfmig") and vname != case["vfmig_config"]:
                    sp, bound = case["speedups"].get(vname), case["speedup_bounds"].get(vname)
                    sp_cell = f"{sp:.1f}x" if sp is not None else f">= {bound:.1f}x" if bound is not None else "-"
                    g = {None: "", True: "yes", False: "**no**"}[case.get("goals", {}).get(vname)]
                    rows.append(f"| | | {vname}: {_vfmig_cell(vr)} | | {sp_cell} | {g} |")
    idle = r.get("idle") or {}
    if idle.get("vs_tcp") is not None:
        per = ", ".join(f"{x:.2f}" for x in idle["vs_tcp_runs"])
        wall = ", ".join(f"{x:.2f}" for x in idle["ram_wall_vs_tcp_runs"])
        rows.append(
            f"| idle, {idle['memory_mib']} MiB, three CLI processes | throughput / loopback TCP | "
            f"{_gb(idle['throughput_Bps'])} (TCP {_gb(idle['tcp_loopback_Bps'])}) | | "
            f"{idle['vs_tcp']:.2f}x (reps: {per}); RAM / migrate wall time: {idle['ram_wall_vs_tcp']:.2f}x "
            f"(reps: {wall}) | |"
        )
    streams = idle.get("channels", 1)
    mib = idle.get("memory_mib")
    for ref, what in (  # references added in later runs appear when the run has them
        ("tcp_ram", f"loopback TCP moving {mib} MiB of RAM into fresh memory"),
        (f"tcp_{streams}", f"loopback TCP, {streams} streams (as many as vfmig's channels)"),
        (f"tcp_ram_{streams}", f"loopback TCP, {streams} streams, moving RAM into fresh memory"),
    ):
        if idle.get(f"vs_{ref}") is None:
            continue
        per = ", ".join(f"{x:.2f}" for x in idle[f"vs_{ref}_runs"])
        bps = idle[ref_bps_key(ref)]
        rows.append(
            f"| | throughput / {what} | {_gb(idle['throughput_Bps'])} (TCP {_gb(bps)}) | | "
            f"{idle[f'vs_{ref}']:.2f}x (reps: {per}) | |"
        )
    return "\n".join(rows)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    block = f"{begin}\n{body}\n{end}"
    return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)


def update_readme() -> None:
    readme = ROOT / "README.md"
    text = _replace(readme.read_text(), BEGIN, END, render())
    text = _replace(text, RELIABILITY_BEGIN, RELIABILITY_END, render_reliability())
    text = _replace(text, PROBES_BEGIN, PROBES_END, render_probes())  # where README has the markers
    text = _replace(text, CONVERGE_BEGIN, CONVERGE_END, render_converge())
    readme.write_text(text)


if __name__ == "__main__":
    update_readme()
    print(render())
    print(render_reliability())
    print(render_probes())
    print(render_converge())
