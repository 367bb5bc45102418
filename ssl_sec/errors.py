"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing data, wrong checkpoint).

    The message must name the offending key, value or path and say how to fix it.
    """


class ConfigError(UserError):
    """An unknown key, a wrong type or an out-of-range value in a recipe or override."""


class DataError(UserError):
    """A dataset that is missing, corrupt or not what the recipe asked for."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not match the recipe."""
