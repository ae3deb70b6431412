"""`python -m adl ...` (also what `torchrun -m adl` runs)."""

from adl.cli import main

main()
