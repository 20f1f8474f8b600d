"""User-facing errors.

A `HogwildError` carries one line that names the problem and what is supported. The CLI and the server print it
as-is (no traceback); internal invariants use asserts instead.
"""


class HogwildError(Exception):
    """A problem with user input: a flag, a model folder, a prompt, an HTTP body."""
