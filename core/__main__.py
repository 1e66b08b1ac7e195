"""``python -m core``: the command line. The commands join the library with the study database, so they live in
``services.cli``; this shim is the only module under ``core/`` that reaches outside the library."""

import sys

from services.cli import main

sys.exit(main())
