"""What a migration cost: the typed record (model.py)."""

from vfmig.report.model import CHECKPOINTS, Checkpoint, DeviceReport, GuestReport, Iteration, Report

__all__ = ["CHECKPOINTS", "Checkpoint", "DeviceReport", "GuestReport", "Iteration", "Report"]
