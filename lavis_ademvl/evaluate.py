"""`python -m lavis_ademvl.evaluate` (and `torchrun -m lavis_ademvl.evaluate`): the same program as `ademvl evaluate`
(lavis_ademvl/cli/evaluate.py), kept at this path for existing scripts and launchers."""
import sys

from lavis_ademvl.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
