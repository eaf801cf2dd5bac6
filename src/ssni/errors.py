"""One error family for everything a user can cause.

Each message says what was expected, what was found and what to do. The CLI
prints ``str(error)`` on one line and exits with status 2; library callers can
catch :class:`SSNIError` (or a subclass) to handle user errors as a group.
"""


class SSNIError(Exception):
    """Base class of every user-causable error raised by ``ssni``."""


class SSNIWarning(UserWarning):
    """Something a user should know that does not stop the run (the CLI prints ``warning: ...``)."""


class InputError(SSNIError, ValueError):
    """An image batch, label tensor or noise level is not what the API expects."""


class CheckpointError(SSNIError):
    """A weight file is missing, corrupt, of the wrong format or mismatched."""


class ConfigError(SSNIError, ValueError):
    """A configuration value or option is invalid."""


class ResumeError(SSNIError):
    """A run cannot resume from the state found in its output folder."""


class ResourceError(SSNIError):
    """The device lacks what a run needs (memory for one sample, or the device itself)."""
