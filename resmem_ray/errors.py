"""The one exception type the CLI turns into a single-line error and a non-zero exit."""


class ResMemError(Exception):
    """A user-facing problem: bad config, missing stage input, mismatched artifact."""


class ConfigError(ResMemError):
    """A config key with a value that cannot work; the message names the key."""
