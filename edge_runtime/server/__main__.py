"""`python -m edge_runtime.server OUT_DIR ...` (the same as `edge-serve`)."""
from .cli import main

main(prog_name="edge-serve")
