"""Typed errors. Each names the problem and says how to fix it.

Bad input raises an :class:`AdaptersError` (a ``ValueError``); a training run that has to stop
raises a :class:`TrainingError` (a ``RuntimeError``). The subclasses let tests and programs
tell the cases apart.
"""


class AdaptersError(ValueError):
    """Base class of every error this library raises on bad input."""


class UnknownModelError(AdaptersError):
    """The model name is neither packaged, a local folder, nor resolvable on the hub."""


class ConfigError(AdaptersError):
    """A configuration value is out of range or of the wrong kind."""


class TargetModulesError(AdaptersError):
    """Adapter target patterns matched no module of the base model."""


class DataError(AdaptersError):
    """The training or evaluation data cannot be used (empty, missing column, bad label)."""


class CheckpointError(AdaptersError):
    """A saved artifact is missing files, is corrupt, or does not match the base model."""


class TrainingError(RuntimeError):
    """Training stopped; the message says where the last good checkpoint is."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the weights were not updated with it."""


class TrainingInterrupted(TrainingError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved and the message says how to resume."""


class StorageError(AdaptersError):
    """A destination cannot be written (read-only, no permission, not a folder) or the disk filled up while
    writing; what was written partly is removed and what was there before is intact."""
