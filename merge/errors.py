"""The one exception type a user sees: a single line naming the culprit and the fix."""


class EvomergeError(Exception):
    """Wrong input or an unusable environment. The CLI prints the message alone and exits 2.

    Messages name the file, field or tensor at fault and say what to do about it.
    """
