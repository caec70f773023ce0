import sys

from testkit.small_models import main

sys.exit(main())
