"""User-facing errors. The CLI turns any `ClvrError` into a one-line message and exit code 2."""


class ClvrError(Exception):
    """Bad input from the user (prompt, config key, checkpoint, file): the message says what is wrong."""


class ConfigError(ClvrError):
    pass


class CheckpointError(ClvrError):
    pass
