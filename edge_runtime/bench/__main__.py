"""`python -m edge_runtime.bench` = `edge-bench`."""
from .cli import main

main(prog_name="edge-bench")
