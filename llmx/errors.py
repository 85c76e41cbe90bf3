"""Errors meant for people: caught once at each entry point and printed as one line."""


class LlmxError(Exception):
    """A problem the user can fix (bad config, missing data, unusable checkpoint)."""


class ConfigError(LlmxError):
    """A config key, value or combination that cannot work."""


class DataError(LlmxError):
    """A data source that yields nothing usable."""


class CheckpointError(LlmxError):
    """A checkpoint that is missing, corrupt, or does not fit the configured model."""


class TrainingError(LlmxError):
    """Training that cannot go on as configured (a non-finite loss under train.on_nan=stop)."""
