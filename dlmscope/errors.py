"""One exception type for bad user input, so the CLI can print it as a single line."""


class DLMScopeError(ValueError):
    """Bad input: the message names the offending value and what is allowed."""


def check(condition: bool, message: str) -> None:
    """Raise `DLMScopeError(message)` unless `condition` holds."""
    if not condition:
        raise DLMScopeError(message)
