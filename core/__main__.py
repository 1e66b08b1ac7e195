"""``python -m core``: the command line. The commands join the library with the study database, so they live in
``services.cli``; this shim is the only module under ``core/`` that reaches outside the library. ``jobs`` commands
go straight to ``services.jobs.cli``, which starts without loading torch."""

import sys

if sys.argv[1:2] == ["jobs"]:
    from services.jobs.cli import main as jobs_main

    sys.exit(jobs_main(sys.argv[1:]))

from services.cli import main  # noqa: E402

sys.exit(main())
