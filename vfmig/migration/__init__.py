"""Live migration: the source's phases (source.py), the destination (destination.py), the control
wire (wire.py) and the policy that decides when to stop iterating (policy.py)."""

from vfmig.migration.destination import Incoming, Limits, Listener, Timeouts
from vfmig.migration.policy import Policy
from vfmig.migration.source import IN_DOUBT, CommitError, LimitCancelled, Migration, MigrationOptions, migrate

__all__ = [
    "IN_DOUBT",
    "CommitError",
    "LimitCancelled",
    "Incoming",
    "Limits",
    "Listener",
    "Migration",
    "MigrationOptions",
    "Policy",
    "Timeouts",
    "migrate",
]
