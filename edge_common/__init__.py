"""Pieces every side (convert, quant, runtime) stands on; this package imports none of them."""
