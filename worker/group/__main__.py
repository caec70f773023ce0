"""``torchrun -m worker.group``: run one rank of the resident group."""

import sys

from worker.group.rank import main

sys.exit(main())
