"""kdkit's user-facing errors: each names what was wrong and what would be right."""


class KdkitError(Exception):
    """Base of errors meant for the user, printed by the CLI without a traceback."""


class ConfigError(KdkitError, ValueError):
    """A recipe or override names an unknown key, has a wrong type or a bad value."""


class MissingDatasetError(KdkitError, FileNotFoundError):
    """A dataset is not where kdkit looked, and cannot be downloaded."""


class CheckpointError(KdkitError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the model."""


class ShapeMismatchError(KdkitError, ValueError):
    """Teacher and student tensors a loss compares cannot be matched."""


class UnknownNameError(KdkitError, KeyError):
    """A registry has no entry of that name; the message lists the choices."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class TokenizerMismatchError(KdkitError, ValueError):
    """Teacher and student tokenize differently, so their token distributions cannot be compared position by position."""


class DataFileError(KdkitError, ValueError):
    """A data file is unreadable or holds a malformed row; the message names the file and the row (or line)."""
