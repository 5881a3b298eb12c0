"""Errors the library raises for problems a user can fix.

Every message names the problem and the fix; the CLI prints it on one line and exits with code 2.
"""


class BrecqError(Exception):
    """Base class of errors caused by user input (bad config, data, model or checkpoint)."""


class ConfigError(BrecqError, ValueError):
    """A configuration value is out of range or inconsistent."""


class DataError(BrecqError):
    """Calibration or evaluation data is missing, empty, unreadable or not finite."""


class ModelError(BrecqError):
    """A model name is unknown, a checkpoint is missing or does not match the model."""


class ReconstructionError(BrecqError):
    """A unit could not be reconstructed (out of memory, non-finite loss)."""


class CheckpointError(BrecqError):
    """A resume checkpoint is missing, unreadable or belongs to a different run."""
