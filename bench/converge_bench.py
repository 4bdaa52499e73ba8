"""Convergence benchmark (issue 10): vfmig against QEMU 7.2, same guest image, same limits, one run.

Rows: a 1 GiB guest running the dirtier at full rate (rate 0) over 128 MiB and over 512 MiB
with the sequential pattern, and over 128 MiB with the fresh pattern (every page rewritten whole
with new data each pass, so neither deltas nor compression help; 512 MiB with --fresh-512: its
first pass alone takes ~7 min here). Each row runs at downtime limits of 30 and 300 ms:

  unlimited link  vfmig (defaults: delta pages, then throttling, as remedies), the same with
                  --compress zstd, QEMU default, QEMU with xbzrle (xbzrle-cache-size 256 MiB),
                  QEMU with auto-converge;
  1 Gbit/s link   vfmig --bandwidth 125M, with and without --compress zstd; QEMU max-bandwidth
                  125000000, default and with multifd + multifd-compression zstd.

vfmig runs go through the CLI as three processes, as an operator runs them: `vfmig vm run
--control SOCK ...`, `vfmig receive --listen tcp://127.0.0.1:0 --json ...` and `vfmig migrate
--to ... --control SOCK --max-downtime MS --json ...`. Every guest makes a full pass over its
working set first (polled through the control socket's vcpu_stats, or QEMU's monitor). A QEMU
run that has not completed after --qemu-timeout s is cancelled (migrate_cancel) and recorded as
"did not converge"; QEMU runs of a row are chained (a completed migration's destination is the
next run's source, a cancelled one's source runs on), so the guest settles once per row.

Per run: total time, downtime (vfmig: the engine's and the guest's figure), bytes sent,
iterations, whether it completed and held the limit (vfmig: the larger of its two figures), and
vfmig's remedies. Per row, limit and link: QEMU's fastest configuration that held the limit,
vfmig's speedup (QEMU time / vfmig time), and whether the goal holds (vfmig holds the limit and
is >= 10x faster). An "idle" row: a 1 GiB idle guest through the same three processes, beside
loopback TCP measured right before each run (vfmig throughput / TCP; REPS reps, median).

vfmig flags that `vfmig migrate --help` does not list (delta pages and compression were being
added when this was written) make their runs "skipped" with that reason.

    .venv/bin/python bench/converge_bench.py [--quick] [--skip-qemu] [--qemu-timeout S]
        [--fresh-512] [--verify] [--reps N]

--quick: the sequential 128 MiB row at 30 ms, vfmig and QEMU default only, and one idle rep;
it writes bench/results/converge.quick.json instead of converge.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median, ref_bps_key, write_results  # noqa: E402
from migrate_bench import _free_port, warm_memory  # noqa: E402
from qemu import Qemu, available  # noqa: E402

from vfmig import _core, control  # noqa: E402
from vfmig.errors import VfmigError  # noqa: E402

VFMIG = [sys.executable, "-m", "vfmig"]
MEMORY_MIB = 1024
LIMITS_MS = (30, 300)
GOAL_SPEEDUP = 10.0
LINK_1G_BPS = 125_000_000  # 1 Gbit/s: vfmig --bandwidth 125M, QEMU max-bandwidth
UNLIMITED_BPS = 100 << 30  # QEMU's max-bandwidth "far above the link", as bench/migrate_bench.py
XBZRLE_CACHE = 256 << 20
IDLE_LIMIT_MS = 300  # the idle row: vfmig's default limit
MIGRATE_TIMEOUT_S = 300  # a vfmig migrate process (its own --time-limit is 120 s)
MIN_FRESH_PPS = 100  # settle timeouts assume at least this many fresh pages/s (~300 measured)


@dataclass(frozen=True)
class Row:
    name: str
    pattern: str
    wss_mib: int

    def settle_timeout_s(self) -> float:
        """A full first pass: seconds for the sequential pattern, minutes for fresh."""
        pages = self.wss_mib << 8
        return 120.0 if self.pattern != "fresh" else max(120.0, pages / MIN_FRESH_PPS)


@dataclass(frozen=True)
class VfmigConfig:
    name: str
    link: str  # "unlimited" or "1gbit"
    args: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # `vfmig migrate` flags it needs (checked against --help)


@dataclass(frozen=True)
class QemuConfig:
    name: str
    link: str
    caps: dict[str, bool] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    needs_multifd_zstd: bool = False


ROWS = (
    Row("sequential-128M", "sequential", 128),
    Row("sequential-512M", "sequential", 512),
    Row("fresh-128M", "fresh", 128),
)
FRESH_512 = Row("fresh-512M", "fresh", 512)
# vfmig with both of its remedies enabled (delta pages are on by default; throttling is opt-in,
# as QEMU's auto-converge is, and QEMU gets its own auto-converge configuration below).
_REMEDIES = ("--auto-converge",)
VFMIG_CONFIGS = (
    VfmigConfig("vfmig", "unlimited", _REMEDIES),
    VfmigConfig("vfmig-zstd", "unlimited", ("--compress", "zstd", *_REMEDIES), ("--compress",)),
    VfmigConfig("vfmig-1g", "1gbit", ("--bandwidth", "125M", *_REMEDIES)),
    VfmigConfig("vfmig-1g-zstd", "1gbit", ("--bandwidth", "125M", "--compress", "zstd", *_REMEDIES), ("--compress",)),
)
# Every run sets every capability it could have inherited (the chain reuses QEMU processes).
_CAPS_OFF = {"xbzrle": False, "auto-converge": False, "multifd": False}
QEMU_CONFIGS = (
    QemuConfig("qemu", "unlimited"),
    QemuConfig("qemu-xbzrle", "unlimited", {"xbzrle": True}, {"xbzrle-cache-size": XBZRLE_CACHE}),
    QemuConfig("qemu-auto-converge", "unlimited", {"auto-converge": True}),
    QemuConfig("qemu-1g", "1gbit"),
    QemuConfig(
        "qemu-1g-multifd-zstd", "1gbit", {"multifd": True}, {"multifd-compression": "zstd"}, needs_multifd_zstd=True
    ),
)
PRIMARY_VFMIG = {"unlimited": "vfmig", "1gbit": "vfmig-1g"}  # the figure the goal is judged on


# --------------------------------------------------------------------------------------------
# what this vfmig and this QEMU can do


def vfmig_migrate_flags() -> dict[str, bool]:
    """Which of the flags the configurations need `vfmig migrate --help` lists."""
    out = subprocess.run([*VFMIG, "migrate", "--help"], capture_output=True, text=True, timeout=120).stdout
    wanted = {f for c in VFMIG_CONFIGS for f in c.needs} | {"--delta", "--delta-cache", "--compress", "--limit-action"}
    return {f: re.search(re.escape(f) + r"\b", out) is not None for f in sorted(wanted)}


def qemu_multifd_zstd() -> str | None:
    """None if QEMU here takes multifd-compression zstd, else why not."""
    try:
        with Qemu(64, "idle") as q:
            q.set_capabilities(multifd=True)
            q.cmd("migrate-set-parameters", **{"multifd-compression": "zstd"})
            got = q.cmd("query-migrate-parameters").get("multifd-compression")
    except RuntimeError as e:
        return f"QEMU refused multifd-compression zstd: {e}"
    return None if got == "zstd" else f"QEMU took multifd-compression zstd but reports {got!r}"


# --------------------------------------------------------------------------------------------
# vfmig through its CLI


class Procs:
    """The processes of one vfmig run; whatever is left running at the end is terminated."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        err = open(self.tmp / f"{name}.stderr", "wb")  # noqa: SIM115 - the child holds it
        p = subprocess.Popen([*VFMIG, *args], stdout=subprocess.PIPE, stderr=err)
        err.close()
        self.procs.append(p)
        return p

    def stderr(self, name: str) -> str:
        path = self.tmp / f"{name}.stderr"
        return path.read_text(errors="replace").strip() if path.exists() else ""

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stdout:
                p.stdout.close()


def read_line_with(p: subprocess.Popen[bytes], needle: str, timeout: float) -> str:
    """The first stdout line of `p` that contains `needle` (its output is polled, not slept on)."""
    assert p.stdout is not None
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if needle in text:
                    return text
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no line with {needle!r} within {timeout:g} s")
            if sel.select(left):
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"the process exited (rc {p.wait()}) before printing {needle!r}")
                buf += chunk


def wait_settled(sock: str, passes: int, timeout: float) -> dict[str, Any]:
    """Poll the VM's control socket until every vCPU made `passes` passes; returns the status."""
    deadline = time.monotonic() + timeout
    while True:
        answer = control.request(sock, {"cmd": "status"}, timeout=10)
        st: dict[str, Any] = answer.get("status") or {}
        stats = st.get("vcpu_stats")
        if stats is None:
            raise RuntimeError("the VM's status has no vcpu_stats (a vfmig without them): cannot tell it settled")
        if stats and all(s["passes"] >= passes for s in stats):
            return st
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest did not make {passes} pass(es) in {timeout:g} s: {stats}")
        time.sleep(0.1)


def vfmig_run(
    tmp: Path, guest_args: list[str], limit_ms: float, extra: tuple[str, ...], settle_s: float, verify: bool
) -> dict[str, Any]:
    """One migration through the three CLI processes; the figures from the source's report."""
    tag = f"run{time.monotonic_ns()}"
    sock = str(tmp / f"{tag}.sock")
    src_json, dst_json = tmp / f"{tag}-src.json", tmp / f"{tag}-dst.json"
    procs = Procs(tmp)
    rec: dict[str, Any] = {"limit_ms": limit_ms, "args": list(extra), "completed": False, "held": False}
    try:
        vm = procs.start(f"{tag}-vm", "vm", "run", "--control", sock, *guest_args, "--seconds", "0")
        read_line_with(vm, "control socket", 120)
        t_settle = time.monotonic()
        wait_settled(sock, 1, settle_s)
        rec["settle_s"] = round(time.monotonic() - t_settle, 2)
        # After the settle, which takes minutes for the fresh pattern: this machine hands freed
        # memory back to its host within ~2 s, and a destination on cold memory pays ~1.7 s/GiB.
        warm_memory(MEMORY_MIB)
        rcv = procs.start(f"{tag}-rcv", "receive", "--listen", "tcp://127.0.0.1:0", "--json", str(dst_json))
        address = read_line_with(rcv, "listening on", 60).split("listening on", 1)[1].strip()
        cmd = [*VFMIG, "migrate", "--to", address, "--control", sock, "--max-downtime", f"{limit_ms:g}"]
        cmd += ["--json", str(src_json), *extra] + (["--verify"] if verify else [])
        t0 = time.monotonic()
        mig = subprocess.run(cmd, capture_output=True, text=True, timeout=MIGRATE_TIMEOUT_S)
        rec["wall_ms"] = (time.monotonic() - t0) * 1e3
        rec["rc"] = mig.returncode
        if mig.returncode != 0 or not src_json.exists():
            lines = (mig.stderr or mig.stdout).strip().splitlines()
            rec["error"] = lines[-1] if lines else f"vfmig migrate exited {mig.returncode}"
            return rec
        rec.update(_from_report(json.loads(src_json.read_text()), limit_ms))
        for p, name in ((vm, "vm"), (rcv, "rcv")):  # the source exits once migrated away, the
            try:  # destination after running the guest --run-seconds
                if p.wait(60) != 0:
                    rec[f"{name}_error"] = (procs.stderr(f"{tag}-{name}").splitlines() or ["?"])[-1]
            except subprocess.TimeoutExpired:
                rec[f"{name}_error"] = "still running 60 s after the migration"
    except (RuntimeError, OSError, VfmigError, subprocess.TimeoutExpired) as e:
        rec["error"] = str(e)
        stderr = procs.stderr(f"{tag}-vm")
        if stderr:
            rec["vm_stderr"] = stderr.splitlines()[-1]
    finally:
        procs.close()
    return rec


def _from_report(r: dict[str, Any], limit_ms: float) -> dict[str, Any]:
    downtime, guest = r.get("downtime_ms"), r.get("guest_observed_downtime_ms")
    seen = [d for d in (downtime, guest) if d is not None]
    its = r.get("iterations", [])
    completed = r.get("status") == "completed"
    return {
        "status": r.get("status"),
        "completed": completed,
        "total_time_ms": r.get("total_time_ms"),
        "downtime_ms": downtime,
        "guest_observed_downtime_ms": guest,
        "held": completed and bool(seen) and max(seen) <= limit_ms,
        "downtime_limit_exceeded": r.get("downtime_limit_exceeded"),
        "bytes": r.get("bytes_sent"),
        "throughput_Bps": r.get("throughput_Bps"),
        "iterations": len(its),
        "stop_reason": r.get("stop_reason"),
        "remedies": r.get("remedies", []),
        "max_throttle_pct": max((i.get("throttle_pct", 0) for i in its), default=0),
        "pages": {k: sum(i.get(k, 0) for i in its) for k in ("raw_pages", "delta_pages", "zero_pages", "zstd_pages")},
        # The guest's data, which must cross at least once: round 1 sends every non-zero page.
        "data_bytes": its[0].get("raw_pages", 0) * 4096 if its else None,
        "memory_match": (r.get("verification") or {}).get("memory_match"),
    }


# --------------------------------------------------------------------------------------------
# QEMU


class QemuChain:
    """A settled QEMU source; each migration goes to a new destination, which becomes the source
    if it completed (the guest keeps its written working set, so it settles once per row)."""

    def __init__(self, row: Row) -> None:
        self.row = row
        self.append = f"wss={row.wss_mib}" + (" pattern=fresh" if row.pattern == "fresh" else "")
        self.src: Qemu | None = None
        self.settle_s: float | None = None

    def source(self) -> Qemu:
        if self.src is None:
            self.src = Qemu(MEMORY_MIB, "dirtier", append=self.append)
            self.src.wait_console("dirtier: running", timeout=60)
            t0 = time.monotonic()
            self.src.wait_passes(1, self.row.settle_timeout_s())
            self.settle_s = round(time.monotonic() - t0, 2)
        return self.src

    def run(self, cfg: QemuConfig, limit_ms: float, timeout: float) -> dict[str, Any]:
        rec: dict[str, Any] = {"limit_ms": limit_ms, "completed": False, "held": False}
        rec.update(caps={k: v for k, v in cfg.caps.items() if v}, params=dict(cfg.params))
        try:
            src = self.source()
        except RuntimeError as e:
            self.close()
            return {**rec, "error": str(e)}
        rec["settle_s"] = self.settle_s
        self.settle_s = 0.0  # later runs of the chain find it settled
        warm_memory(MEMORY_MIB)  # for the destination, right before it starts: see vfmig_run
        port = _free_port()
        try:
            dst = Qemu(MEMORY_MIB, "dirtier", incoming="defer", append=self.append)
        except RuntimeError as e:
            return {**rec, "error": str(e)}
        try:
            bandwidth = LINK_1G_BPS if cfg.link == "1gbit" else UNLIMITED_BPS
            params = {"downtime-limit": int(limit_ms), "max-bandwidth": bandwidth, **cfg.params}
            for q in (src, dst):
                q.set_capabilities(**{**_CAPS_OFF, **cfg.caps})
                q.cmd("migrate-set-parameters", **params)
            dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
            info = src.migrate_within(f"tcp:127.0.0.1:{port}", timeout)
        except RuntimeError as e:
            dst.close()
            return {**rec, "error": str(e)}
        rec.update(_from_query_migrate(info, limit_ms, timeout))
        if rec["completed"]:
            src.close()
            self.src = dst
        else:
            dst.close()
        return rec

    def close(self) -> None:
        if self.src is not None:
            self.src.close()
            self.src = None


def _from_query_migrate(info: dict[str, Any], limit_ms: float, timeout: float) -> dict[str, Any]:
    ram = info.get("ram", {})
    completed = info.get("status") == "completed"
    downtime = float(info["downtime"]) if "downtime" in info else None
    rec: dict[str, Any] = {
        "status": "did not converge" if info.get("timed_out") else info.get("status"),
        "completed": completed,
        "total_time_ms": float(info["total-time"]) if "total-time" in info else None,
        "downtime_ms": downtime,  # QEMU's own figure, on the source (README, Probes)
        "held": completed and downtime is not None and downtime <= limit_ms,
        "bytes": ram.get("transferred"),
        "multifd_bytes": ram.get("multifd-bytes"),
        "iterations": ram.get("dirty-sync-count"),
        "expected_downtime_ms": info.get("expected-downtime"),
        "cpu_throttle_pct": info.get("cpu-throttle-percentage"),
        "dirty_pages_rate": ram.get("dirty-pages-rate"),
    }
    if info.get("timed_out"):
        rec["note"] = f"cancelled after {timeout:g} s (migrate_cancel): {info.get('status_after_cancel')}"
    if completed and not rec["total_time_ms"]:
        # Seen once (auto-converge, 300 ms): "completed" with total-time and downtime 0.
        rec["held"] = False
        rec["note"] = "QEMU said completed but reported a total-time of 0 ms: no figure to compare"
    if "xbzrle-cache" in info:
        x = info["xbzrle-cache"]
        rec["xbzrle"] = {k: x.get(k) for k in ("cache-size", "bytes", "pages", "cache-miss-rate", "overflow")}
    return rec


# --------------------------------------------------------------------------------------------
# the comparison


def judge(runs: dict[str, dict[str, Any]], link: str, qemu_timeout: float, tcp_Bps: float | None) -> dict[str, Any]:
    """QEMU's fastest configuration that held the limit, each vfmig configuration's speedup over
    it (or, when no QEMU configuration held, the lower bound its timeout gives) and whether it
    meets the goal, and (unlimited link) whether the goal is reachable at all: the floor is the
    guest's data, uncompressed, over loopback TCP measured beside the row."""
    qemu = {n: r for n, r in runs.items() if n.startswith("qemu") and "skipped" not in r}
    held = {n: r for n, r in qemu.items() if r.get("held")}
    v = runs.get(PRIMARY_VFMIG[link], {})
    out: dict[str, Any] = {"vfmig_config": PRIMARY_VFMIG[link], "vfmig_held": bool(v.get("held"))}
    out["vfmig_time_ms"] = v.get("total_time_ms")
    best = min(held, key=lambda n: held[n]["total_time_ms"]) if held else None
    out["qemu_best"] = best
    out["qemu_best_time_ms"] = held[best]["total_time_ms"] if best else None
    # Per vfmig configuration that completed: QEMU's best time over its time, or, when QEMU
    # never held the limit, its timeout over that time (QEMU would take longer, if it ever held).
    speedups: dict[str, float] = {}
    bounds: dict[str, float] = {}
    for name, r in runs.items():
        if not (name.startswith("vfmig") and r.get("completed") and qemu):
            continue
        if best:
            speedups[name] = held[best]["total_time_ms"] / r["total_time_ms"]
        else:
            bounds[name] = qemu_timeout * 1e3 / r["total_time_ms"]
    out["speedup"], out["speedups"] = speedups.get(PRIMARY_VFMIG[link]), speedups
    out["speedup_bounds"] = bounds
    out["goals"] = {n: bool(runs[n].get("held")) and x >= GOAL_SPEEDUP for n, x in {**speedups, **bounds}.items()}
    data = v.get("data_bytes")
    if link == "unlimited" and best and data and tcp_Bps:
        out["floor_ms"] = data / tcp_Bps * 1e3
        out["goal_reachable"] = held[best]["total_time_ms"] / GOAL_SPEEDUP >= out["floor_ms"]
    if "skipped" in v or not qemu:
        out["goal_met"] = None
        out["note"] = "not measured: " + ("vfmig skipped" if "skipped" in v else "no QEMU runs")
        return out
    if best is None:
        out["speedup_lower_bound"] = bounds.get(PRIMARY_VFMIG[link])
        out["note"] = f"no QEMU configuration held the limit within {qemu_timeout:g} s"
    out["goal_met"] = out["goals"].get(PRIMARY_VFMIG[link], False)
    return out


def _fmt(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return f"skipped ({r['skipped']})"
    if r.get("error"):
        return f"error: {r['error']}"
    t, d = r.get("total_time_ms"), r.get("downtime_ms")
    parts = [str(r.get("status"))]
    if t is not None:
        parts.append(f"total {t / 1e3:.2f} s")
    if d is not None:
        parts.append(f"downtime {d:.1f} ms")
    if r.get("guest_observed_downtime_ms") is not None:
        parts.append(f"guest {r['guest_observed_downtime_ms']:.1f} ms")
    if r.get("bytes") is not None:
        parts.append(f"{r['bytes'] / 2**20:.0f} MiB")
    if r.get("iterations") is not None:
        parts.append(f"{r['iterations']} iterations")
    parts.append("held" if r.get("held") else "NOT held")
    if r.get("remedies"):
        parts.append("remedies " + ", ".join(str(m.get("remedy")) for m in r["remedies"]))
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# the idle row


IDLE_CHANNELS = 2  # vfmig's default, given explicitly so the references match it


def _idle_refs() -> dict[str, float]:
    """The references right beside one run, each TCP on loopback moving 1 GiB: between cache-hot
    1 MiB buffers (its fastest), and from RAM into fresh memory (the job a migration does, on
    memory warmed as vfmig_run warms the destination's); over one stream (the reference the
    goal names) and over as many streams as vfmig has channels."""
    refs = {}
    for streams in (1, IDLE_CHANNELS):
        suffix = "" if streams == 1 else f"_{streams}"
        refs[f"tcp{suffix}"] = _core.ref_tcp_loopback(1 << 30, streams)
        warm_memory(MEMORY_MIB)
        refs[f"tcp_ram{suffix}"] = _core.ref_tcp_loopback_ram(MEMORY_MIB << 20, streams)
    return refs


def idle_row(tmp: Path, reps: int) -> dict[str, Any]:
    guest = ["--memory", f"{MEMORY_MIB}M", "--guest", "idle"]
    runs = []
    for i in range(reps):
        refs = _idle_refs()
        r = vfmig_run(tmp, guest, IDLE_LIMIT_MS, ("--channels", str(IDLE_CHANNELS)), 60, verify=False)
        r.update({ref_bps_key(k): v for k, v in refs.items()})
        failed = {k: v for k, v in refs.items() if v <= 0}  # a reference that failed returns -errno
        if failed:
            r["error"] = f"a TCP reference failed: {failed}"
        elif r.get("completed"):
            r.update({f"vs_{k}": r["throughput_Bps"] / v for k, v in refs.items()})
            r["ram_Bps_wall"] = (MEMORY_MIB << 20) / (r["wall_ms"] / 1e3)
            r["ram_wall_vs_tcp"] = r["ram_Bps_wall"] / refs["tcp"]
        runs.append(r)
        figures = (
            f"{k} {v / 1e9:.2f} GB/s" + (f" ({r[f'vs_{k}']:.2f}x)" if f"vs_{k}" in r else "") for k, v in refs.items()
        )
        print(f"  idle rep {i + 1}: {_fmt(r)}; " + ", ".join(figures), flush=True)
    ok = [r for r in runs if "vs_tcp" in r]
    doc: dict[str, Any] = {
        "memory_mib": MEMORY_MIB,
        "limit_ms": IDLE_LIMIT_MS,
        "reps": reps,
        "channels": IDLE_CHANNELS,
        "runs": runs,
    }
    if ok:
        doc["throughput_Bps"] = median([r["throughput_Bps"] for r in ok])
        for k in refs:
            doc[ref_bps_key(k)] = median([r[ref_bps_key(k)] for r in ok])
        for vs in [f"vs_{k}" for k in refs] + ["ram_wall_vs_tcp"]:
            doc[vs] = median([r[vs] for r in ok])
            doc[f"{vs}_runs"] = [r[vs] for r in ok]
    return doc


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: sequential 128 MiB at 30 ms, vfmig + QEMU")
    ap.add_argument("--skip-qemu", action="store_true")
    ap.add_argument("--qemu-timeout", type=float, default=120.0, metavar="S", help="cancel QEMU after S s")
    ap.add_argument("--fresh-512", action="store_true", help="add the fresh 512 MiB row (~7 min a guest to settle)")
    ap.add_argument("--verify", action="store_true", help="vfmig migrate --verify on every dirtier run")
    ap.add_argument("--reps", type=int, default=3, help="idle reps (default 3; 1 with --quick; 0: no idle row)")
    ap.add_argument(
        "--rows",
        metavar="NAMES",
        help=f"only these rows, comma-separated ({', '.join(r.name for r in (*ROWS, FRESH_512))}; 'idle' alone: "
        "only the idle row, which otherwise follows the named rows unless --reps 0); the results go to "
        "converge.<rows>.json beside the full run's",
    )
    args = ap.parse_args()

    flags = vfmig_migrate_flags()
    print("vfmig migrate flags: " + ", ".join(f"{f} {'yes' if ok else 'NO'}" for f, ok in flags.items()), flush=True)
    qemu_reason = "--skip-qemu" if args.skip_qemu else available()
    multifd_zstd = None if qemu_reason else qemu_multifd_zstd()
    if multifd_zstd:
        print(f"QEMU multifd zstd: {multifd_zstd}", flush=True)

    rows = [ROWS[0]] if args.quick else [*ROWS, *([FRESH_512] if args.fresh_512 else [])]
    if args.rows:
        known = {r.name: r for r in (*ROWS, FRESH_512)}
        unknown = [n for n in args.rows.split(",") if n not in known and n != "idle"]
        if unknown:
            ap.error(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(known)}, idle")
        rows = [known[n] for n in args.rows.split(",") if n != "idle"]
    limits = (30,) if args.quick else LIMITS_MS
    vcfgs = [c for c in VFMIG_CONFIGS if not args.quick or c.name == "vfmig"]
    qcfgs = [c for c in QEMU_CONFIGS if not args.quick or c.name == "qemu"]
    links = sorted({c.link for c in vcfgs}, key=["unlimited", "1gbit"].index)
    reps = 1 if args.quick else args.reps

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vfmig-converge-") as d:
        tmp = Path(d)
        for row in rows:
            print(f"{row.name}: dirtier, {row.pattern}, {row.wss_mib} MiB of {MEMORY_MIB} MiB, rate 0", flush=True)
            runs: dict[tuple[int, str], dict[str, dict[str, Any]]] = {(lim, ln): {} for lim in limits for ln in links}
            tcp = _core.ref_tcp_loopback(1 << 30)  # the link's ceiling, for the floor in judge()
            print(f"  loopback TCP {tcp / 1e9:.2f} GB/s", flush=True)
            guest = ["--memory", f"{MEMORY_MIB}M", "--guest", "dirtier", "--wss", f"{row.wss_mib}M"]
            guest += ["--rate", "0", "--pattern", row.pattern]
            # All vfmig runs, then all QEMU runs: a QEMU guest left running would take a core.
            for lim in limits:
                for vc in vcfgs:
                    missing = [f for f in vc.needs if not flags.get(f)]
                    if missing:
                        rec: dict[str, Any] = {"skipped": f"`vfmig migrate --help` lists no {', '.join(missing)}"}
                    else:
                        rec = vfmig_run(tmp, guest, lim, vc.args, row.settle_timeout_s(), args.verify)
                    runs[(lim, vc.link)][vc.name] = rec
                    print(f"  {lim:>3} ms {vc.name:<22} {_fmt(rec)}", flush=True)
            chain = QemuChain(row)
            try:
                for lim in limits:
                    for qc in qcfgs:
                        if qemu_reason:
                            rec = {"skipped": qemu_reason}
                        elif qc.needs_multifd_zstd and multifd_zstd:
                            rec = {"skipped": multifd_zstd}
                        else:
                            rec = chain.run(qc, lim, args.qemu_timeout)
                        runs[(lim, qc.link)][qc.name] = rec
                        print(f"  {lim:>3} ms {qc.name:<22} {_fmt(rec)}", flush=True)
            finally:
                chain.close()
            cases: dict[str, Any] = {}
            for (lim, link), case_runs in runs.items():
                verdict = judge(case_runs, link, args.qemu_timeout, tcp)
                cases[f"{lim:g}ms/{link}"] = {"limit_ms": lim, "link": link, "runs": case_runs, **verdict}
                sp = verdict.get("speedup") or verdict.get("speedup_lower_bound")
                bound = ">=" if verdict.get("speedup") is None and sp else ""
                print(
                    f"  => {lim:g} ms, {link}: QEMU best {verdict['qemu_best'] or 'none held'}; "
                    f"vfmig speedup {bound}{sp:.1f}x; goal (held, >= {GOAL_SPEEDUP:g}x) {verdict['goal_met']}"
                    if sp
                    else f"  => {lim:g} ms, {link}: goal {verdict['goal_met']} ({verdict.get('note', '')})",
                    flush=True,
                )
            results[row.name] = {"pattern": row.pattern, "wss_mib": row.wss_mib, "tcp_loopback_Bps": tcp}
            results[row.name]["cases"] = cases
        if reps:
            print("idle: 1 GiB idle guest, three CLI processes, beside loopback TCP", flush=True)
        idle = idle_row(tmp, reps) if reps else None

    doc = {
        "memory_mib": MEMORY_MIB,
        "quick": args.quick,
        "limits_ms": list(limits),
        "goal_speedup": GOAL_SPEEDUP,
        "qemu_timeout_s": args.qemu_timeout,
        "verify": args.verify,
        "vfmig_migrate_flags": flags,
        "qemu_skipped": qemu_reason,
        "qemu_multifd_zstd": "supported" if not (qemu_reason or multifd_zstd) else multifd_zstd or qemu_reason,
        "notes": [
            "vfmig total_time_ms runs from the migrate request to the guest resumed on the destination; QEMU's "
            "total-time to completion on the source. QEMU's downtime is its own figure (source side); vfmig's "
            "limit is judged on the larger of its engine and guest-observed downtime.",
            "QEMU runs of a row are chained: a completed migration's destination is the next run's source.",
            "QEMU 7.2 counts multifd pages before compression, in ram.transferred and against max-bandwidth "
            "(multifd_send_pages): with multifd-compression zstd its bytes are not wire bytes, and its 1 Gbit/s "
            "limit caps uncompressed pages (a smoke run on 256 MiB moved 126 MB/s of them at max-bandwidth 125 MB/s).",
            "floor_ms (unlimited link): the guest's data (round 1's non-zero pages) over loopback TCP measured at "
            "the row's start, the least time any migrator could take; goal_reachable is false where QEMU's best "
            "time divided by the goal is below it.",
            "The fresh pattern dirties ~300 pages/s here (this KVM emulates every guest instruction), "
            "~1.2 MB/s: it converges for everyone; it shows what delta pages and compression cannot do.",
        ],
        "rows": results,
        "idle": idle,
    }
    with contextlib.suppress(Exception):
        doc["notes"].append(f"machine load average at the end: {os.getloadavg()}")
    name = "converge.quick" if args.quick else f"converge.{args.rows.replace(',', '+')}" if args.rows else "converge"
    path = write_results(name, doc)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
