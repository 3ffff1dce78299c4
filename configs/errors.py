"""The errors a user causes and can fix: a bad config, bad data, a bad checkpoint.

Entry points (train.py, python -m eval, python -m data.prepare, python -m scripts.export) print these as
one line and exit 2; every other exception is a bug and keeps its traceback. The config and data errors
are also ValueErrors, so code that validates input can be tested with pytest.raises(ValueError).
"""
import sys


class UserError(Exception):
    """Base of the errors that get one line and exit code 2."""


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an impossible value in the config or on the command line."""


class DataError(UserError, ValueError):
    """Missing, malformed or inconsistent training or evaluation data."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is incomplete, from another model, or not safe to load."""


def run_cli(entry_point) -> int:
    """Run a command-line entry point: its exit code (an int it returns, else 0), or 2 and one line on
    stderr for a user error; any other exception is a bug and propagates with its traceback."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        code = entry_point()
    except (UserError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def one_line(err: Exception) -> str:
    """Hydra's messages span lines (option lists, search paths); keep the message and the options."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    message = lines[0]
    if message.startswith("Could not override"):
        message += " (no such key in the schema)"
    if "Available options" in str(err):
        start = next(i for i, line in enumerate(lines) if line.startswith("Available options")) + 1
        options = [line for line in lines[start:] if not line.startswith(("Config search path", "provider="))]
        message += "; available: " + ", ".join(options)
    return message
