"""`python -m lavis_ademvl.train` (and `torchrun -m lavis_ademvl.train`): the same program as `ademvl train`
(lavis_ademvl/cli/train.py), kept at this path for existing scripts and launchers."""
import sys

from lavis_ademvl.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
