"""The errors a user causes and can fix: a bad config, bad data, a bad checkpoint.

Entry points (train.py, python -m eval, python -m data.prepare, python -m scripts.export) print these as
one line and exit 2; every other exception is a bug and keeps its traceback. The config and data errors
are also ValueErrors, so code that validates input can be tested with pytest.raises(ValueError).
"""


class UserError(Exception):
    """Base of the errors that get one line and exit code 2."""


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an impossible value in the config or on the command line."""


class DataError(UserError, ValueError):
    """Missing, malformed or inconsistent training or evaluation data."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is incomplete, from another model, or not safe to load."""
