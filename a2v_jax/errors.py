"""The project's error base: every error whose message is written for the user derives from ``A2VError``.

Why one base: the command-line tools print such an error's message alone and exit 2 (a traceback would
only hide it), while any other exception is a bug and keeps its traceback. With one base a CLI catches
``A2VError`` instead of listing a dozen classes from a dozen modules. Each subclass also keeps the
builtin it always was (``ValueError``, ``RuntimeError``, ...), so existing ``except`` clauses still hold.
This module imports nothing from the project: every layer may import it.
"""


class A2VError(Exception):
  """An error with a message for the user: what was found, what was expected, what to do."""
