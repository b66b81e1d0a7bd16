"""`python -m lavis_ademvl.cli <command> ...`: the `ademvl` command without its console script."""
import sys

from lavis_ademvl.cli import main

sys.exit(main())
