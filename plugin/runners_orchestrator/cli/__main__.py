"""``python -m runners_orchestrator.cli``: how ``dev`` and ``--reload`` start our commands."""

import sys

from runners_orchestrator.cli import main

sys.exit(main())
