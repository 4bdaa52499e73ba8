"""vfmig: live migration of VMs with assigned PCI devices, and what it cost."""

from vfmig.errors import ConfigError, HostError, MigrationError, VfmigError
from vfmig.vm import MicroVM, VMConfig, VMState

__all__ = ["ConfigError", "HostError", "MicroVM", "MigrationError", "VMConfig", "VMState", "VfmigError"]
__version__ = "0.1.0"
