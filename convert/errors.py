"""The one exception type the converter raises for bad input."""


class ConvertError(Exception):
    """Bad input or environment: the message names the file or option and the fix.

    The CLI prints it without a traceback and exits with code 2.
    """
