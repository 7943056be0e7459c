"""The one exception type the quant package raises for bad input."""


class QuantError(ValueError):
    """Bad option, file or environment: the message names it and says how to fix it.

    A ValueError so callers that validate options can catch it generically; the
    CLI prints it without a traceback (exit code 2, as for ConvertError).
    """
