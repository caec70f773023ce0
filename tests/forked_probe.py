"""``python -m tests.forked_probe CODE [SLEEP_S]``: prints its argv, what it was given in
``PROBE`` and whether torch was imported before it ran, then sleeps and exits with ``CODE``
(tests/unit/test_forkserver.py)."""

import os
import sys
import time

print(f"argv={sys.argv[1:]} probe={os.environ.get('PROBE')} torch={'torch' in sys.modules}", flush=True)
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
sys.exit(int(sys.argv[1]))
