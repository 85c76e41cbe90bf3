"""Errors meant for people: caught once at each entry point and printed as one line."""


class LlmxError(Exception):
    """A problem the user can fix (bad config, missing data, unusable checkpoint)."""


class ConfigError(LlmxError):
    """A config key, value or combination that cannot work."""


class DataError(LlmxError):
    """A data source that yields nothing usable."""


class CheckpointError(LlmxError):
    """A checkpoint that is missing, corrupt, or does not fit the configured model."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read back (truncated, missing or garbled): unlike one that does
    not fit the model, an earlier checkpoint of the same run may still be good."""


class ResourceError(LlmxError):
    """What the run needs is taken or too small: its run directory (held by another trainer), or the
    devices' memory."""


class TrainingError(LlmxError):
    """Training that cannot go on as configured (a non-finite loss under train.on_nan=stop)."""
