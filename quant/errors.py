"""The one exception type the quant package raises for bad input."""


class QuantError(ValueError):
    """Bad option, file or environment: the message names it and says how to fix it.

    A ValueError so callers that validate options can catch it generically; the
    CLI prints it without a traceback (exit code 2, as for ConvertError).
    """


def check_rewrite(src, dst, overwrite: bool, what: str) -> None:
    """A quantizer reads `src` and writes `dst`: both must make sense before any work starts."""
    if not src.is_file():
        raise QuantError(f"{src}: {what} GGUF not found.")
    if dst.exists() and not overwrite:
        raise QuantError(f"{dst} already exists; pass --overwrite to replace it.")
    if dst.resolve() == src.resolve():
        raise QuantError(f"{dst}: input and output are the same file.")
