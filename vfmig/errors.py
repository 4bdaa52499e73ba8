"""The errors vfmig raises. The CLI prints them as one line and exits non-zero."""


class VfmigError(Exception):
    """Base: a problem the user can act on; str() is the one-line message."""


class ConfigError(VfmigError):
    """A setting out of range, an unknown name, a malformed size or address."""


class HostError(VfmigError):
    """The host cannot do what was asked (no /dev/kvm, not enough memory)."""


class MigrationError(VfmigError):
    """A migration failed. The source VM was left running and unchanged."""
