"""The evaluation's input errors."""


class EvalError(ValueError):
    """Bad evaluation input: no prompts, an unreadable model path, a malformed prompt record ..."""
