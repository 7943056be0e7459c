"""The one exception type the quant package raises for bad input."""
from edge_common.errors import EdgeError


class QuantError(EdgeError, ValueError):
    """Bad option, file or environment: the message names it and says how to fix it.

    A ValueError so callers that validate options can catch it generically; the
    CLI prints it without a traceback (exit code 2, as for ConvertError).
    """
