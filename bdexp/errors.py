"""Errors a user can act on: the CLI prints their message without a traceback."""


class BdexpError(Exception):
    """Base class: the message names the problem and the fix."""


class ConfigError(BdexpError):
    """An invalid key, value or combination in the composed config."""


class DatasetUnavailable(BdexpError):
    """A dataset is not on disk and could not be downloaded."""


class TrainingDiverged(BdexpError):
    """The loss became NaN or infinite."""
