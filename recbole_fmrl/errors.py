"""Errors in a run's input (files, columns, configuration keys): the command line prints them as one line.

``InputError`` is what validation raises when the fault is in what the user gave (a dataset folder,
an atomic file's header, a configuration key, a checkpoint to resume): the message names the file,
column or key and, where there is one, the command that fixes it. ``recbole_fmrl.cli`` prints
``error: <message>`` and exits with status 2; ``--debug`` shows the traceback instead. Anything else
that escapes is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """A problem with the run's input; the message is one line naming the file, column or key."""

    exit_code = 2
