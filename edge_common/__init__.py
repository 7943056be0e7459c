"""Pieces every side (convert, quant, runtime) stands on; this package imports none of them."""
__version__ = "0.1.0"  # the package version, recorded in manifests as converter_version
