"""`python -m edge_bench` = `edge-bench`."""
from .cli import main

main(prog_name="edge-bench")
