import sys

from worker.small_models import main

sys.exit(main())
