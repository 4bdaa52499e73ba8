"""When to stop iterating: estimate the dirty rate and bandwidth, predict the downtime, notice
early when precopy is not converging, and keep the downtime limit's promise (limit_action)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vfmig.errors import ConfigError

PAGE_SIZE = 4096
# Fixed cost of the stop phase beyond the final pages (pausing, device and vCPU state, load,
# start), measured on this micro-VM at ~1-2 ms; used so tiny limits still predict honestly.
STOP_OVERHEAD_MS = 2.0
# What to do when the downtime limit cannot be met (like Nova's live_migration_timeout_action).
# The default is force: an evacuation must finish, a VM with an assigned VF cannot fall back to
# postcopy, and once precopy has stopped converging more rounds do not shorten the stop, they
# only spend time and bandwidth; the report and the CLI then say loudly that the limit was
# exceeded (downtime_limit_exceeded). Callers bound by the limit choose cancel: the migration
# ends and the source keeps running.
LIMIT_ACTIONS = ("force", "cancel")
# A guest that precopy will bring under the limit within this many more rounds at the pace of the
# last one needs no remedy, even if it dirties at over half the link's rate: a remedy costs more
# than those rounds (delta pages fill their cache for a round first; throttling slows the guest).
CONVERGE_ROUNDS = 3


@dataclass
class Policy:
    max_downtime_ms: float = 300.0  # QEMU's default downtime-limit
    max_iterations: int = 30
    time_limit_s: float = 120.0
    auto_converge: bool = False
    throttle_initial: int = 20  # QEMU's cpu-throttle-initial
    throttle_increment: int = 10  # QEMU's cpu-throttle-increment
    throttle_max: int = 99
    limit_action: str = "force"  # see LIMIT_ACTIONS
    stall_rounds: int = 3  # rounds without the dirty set shrinking, on a busy link: not converging

    def validate(self) -> None:
        if not 0 < self.max_downtime_ms <= 600_000:
            raise ConfigError(f"max downtime must be in (0, 600000] ms, got {self.max_downtime_ms:g}")
        if not 1 <= self.max_iterations <= 10_000:
            raise ConfigError(f"max iterations must be 1..10000, got {self.max_iterations}")
        if not 0 < self.time_limit_s <= 86_400:
            raise ConfigError(f"time limit must be in (0, 86400] s, got {self.time_limit_s:g}")
        if self.limit_action not in LIMIT_ACTIONS:
            raise ConfigError(f"limit action must be one of {', '.join(LIMIT_ACTIONS)}, got {self.limit_action!r}")
        if not 1 <= self.stall_rounds <= 100:
            raise ConfigError(f"stall rounds must be 1..100, got {self.stall_rounds}")

    @staticmethod
    def final_dirty_pages(
        dirty_pages: int, dirty_rate_pps: float, handshake_ms: float, total_pages: int | None = None
    ) -> float:
        """The pages the final round will carry if the VM stopped after the guest handshake: what
        is dirty now, plus what the guest dirties while the handshake waits (up to its deadline),
        never more than all of RAM."""
        pages = dirty_pages + max(dirty_rate_pps, 0.0) * max(handshake_ms, 0.0) / 1e3
        return min(pages, float(total_pages)) if total_pages is not None else pages

    @staticmethod
    def predict_downtime_ms(
        dirty_pages: float, bytes_per_page: float, bandwidth_Bps: float, device_bytes: int = 0
    ) -> float:
        """Time to send what is dirty (final_dirty_pages), and what the devices still hold
        (their stop-copy data), at the measured bandwidth, plus the fixed stop cost."""
        if bandwidth_Bps <= 0:
            return float("inf")
        return (dirty_pages * bytes_per_page + device_bytes) / bandwidth_Bps * 1e3 + STOP_OVERHEAD_MS

    def should_stop(
        self, iteration: int, elapsed_s: float, predicted_ms: float, handshake_ms: float = 0.0
    ) -> str | None:
        """The reason to go to stop-and-copy now, or None to iterate again. The guest handshake
        (up to handshake_ms) comes before the stop, so it counts against the time limit."""
        if predicted_ms <= self.max_downtime_ms:
            return f"predicted downtime {predicted_ms:.1f} ms <= {self.max_downtime_ms:g} ms"
        if iteration >= self.max_iterations:
            return f"reached {self.max_iterations} iterations"
        if elapsed_s + handshake_ms / 1e3 >= self.time_limit_s:
            hs = f" (with the {handshake_ms:g} ms handshake to come)" if handshake_ms else ""
            return f"reached the {self.time_limit_s:g} s time limit{hs}"
        return None

    def rounds_to_limit(self, dirty_bytes: float, dirty_Bps: float, bandwidth_Bps: float) -> float:
        """More rounds plain precopy needs before the stop fits the limit: a round carries the
        dirty set at the link's rate while the guest dirties at its own, so the set shrinks by
        dirty_Bps / bandwidth_Bps a round (inf when it does not shrink)."""
        fits = (self.max_downtime_ms - STOP_OVERHEAD_MS) / 1e3 * bandwidth_Bps
        if dirty_bytes <= fits:
            return 0.0
        if fits <= 0 or dirty_Bps >= bandwidth_Bps:
            return math.inf
        if dirty_Bps <= 0:
            return 1.0
        return math.log(dirty_bytes / fits) / math.log(bandwidth_Bps / dirty_Bps)

    def outpaced(self, dirty_Bps: float, bandwidth_Bps: float, dirty_bytes: float = math.inf) -> bool:
        """The guest dirties (in wire bytes) faster than half the link drains, so each round
        shrinks the dirty set by less than half (QEMU's auto-converge test), and at that pace
        precopy is more than CONVERGE_ROUNDS rounds from fitting the limit with `dirty_bytes` to
        send (not given: the first test alone). Known after round 2, before the dirty set can be
        seen not to shrink."""
        if dirty_Bps <= bandwidth_Bps * 0.5:
            return False
        return self.rounds_to_limit(dirty_bytes, dirty_Bps, bandwidth_Bps) > CONVERGE_ROUNDS

    def throttle(self, current: int, dirty_Bps: float, bandwidth_Bps: float, dirty_bytes: float = math.inf) -> int:
        """Auto-converge: throttle the vCPUs harder while they outpace the link (outpaced)."""
        if not self.auto_converge or not self.outpaced(dirty_Bps, bandwidth_Bps, dirty_bytes):
            return current
        if current == 0:
            return self.throttle_initial
        return min(current + self.throttle_increment, self.throttle_max)


@dataclass
class WireCost:
    """What a page costs on the wire, as the last rounds measured it: a page sent whole (raw,
    compressed or not) and a page sent as a delta. The next round's pages are priced by what
    the sender knows of them (Sender.cached(): which the delta cache holds), not by the last
    round's mix: a working set larger than the cache hits for some pages and misses for
    others, and the final round may be all misses after a round of hits."""

    whole: float = float(PAGE_SIZE)
    delta: float | None = None  # None until a delta round was measured: priced as whole

    def update(self, st: dict[str, int]) -> None:
        """One round's counters (PageSender.send_round)."""
        whole = st["pages"] - st["zero_pages"] - st["delta_pages"]
        if whole:
            self.whole = (st["bytes"] - st["delta_bytes"]) / whole
        if st["delta_pages"]:
            self.delta = st["delta_bytes"] / st["delta_pages"]

    def per_page(self, pages: int, cached: int) -> float:
        """The mean cost of `pages` of which `cached` can go as deltas."""
        if pages <= 0:
            return self.whole
        cached = min(max(cached, 0), pages)
        delta = self.delta if self.delta is not None else self.whole
        return (cached * delta + (pages - cached) * self.whole) / pages


@dataclass
class ConvergenceWatch:
    """Is precopy getting anywhere? Each round's dirty set should come out smaller; when it has
    not fallen 10% below its smallest for `rounds` rounds while the link ran at 70% or more of
    its best rate (the link, not something else, is what the guest outpaces), precopy is not
    converging, and more of the same rounds will not make the stop shorter."""

    rounds: int = 3
    smallest: float = float("inf")
    best_bandwidth: float = 0.0
    flat: int = 0  # rounds since the dirty set last shrank

    def observe(self, dirty_pages: int, bandwidth_Bps: float) -> bool:
        """One round's dirty set and link rate; True when not converging."""
        self.best_bandwidth = max(self.best_bandwidth, bandwidth_Bps)
        busy = bandwidth_Bps >= 0.7 * self.best_bandwidth > 0
        if dirty_pages < 0.9 * self.smallest or not busy:
            self.smallest = min(self.smallest, float(dirty_pages))
            self.flat = 0
            return False
        self.smallest = min(self.smallest, float(dirty_pages))
        self.flat += 1
        return self.flat >= self.rounds

    def restart(self) -> None:
        """A remedy engaged: give it `rounds` rounds to show."""
        self.flat = 0
        self.smallest = float("inf")
