"""The one exception type for bad user input.

The CLI turns a ``SparseliteError`` into a single line on stderr and exit code 2. Anything else that
escapes is a bug in sparselite, and keeps its traceback.
"""


class SparseliteError(ValueError):
    """Bad input or an unsupported model: the message says what is wrong and what to do."""
