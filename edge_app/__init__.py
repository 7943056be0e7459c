"""The application layer: commands that combine the sides (convert + quant, convert + runtime).

`edge-convert` (cli.py), the one-command convert-and-quantize (pipeline.py) and
`make demo` (demo.py) live here so that convert, quant and edge_runtime never
import each other.
"""
