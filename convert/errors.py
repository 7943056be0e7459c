"""The one exception type the converter raises for bad input."""
from edge_common.errors import EdgeError


class ConvertError(EdgeError):
    """Bad input or environment: the message names the file or option and the fix.

    The CLI prints it without a traceback and exits with code 2.
    """
