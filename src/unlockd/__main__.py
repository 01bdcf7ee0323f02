from __future__ import annotations

import sys

from unlockd.cli import main

sys.exit(main())
