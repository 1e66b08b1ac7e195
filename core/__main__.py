"""``python -m core``: the command line. The commands join the library with the study database, so they live in
``services.cli``; this shim is the only module under ``core/`` that reaches outside the library. ``jobs`` commands
go straight to ``services.jobs.cli`` and ``agreement`` to ``services.agreement_cli``, which start without loading
torch."""

import sys

if sys.argv[1:2] == ["jobs"]:
    from services.jobs.cli import main as jobs_main

    sys.exit(jobs_main(sys.argv[1:]))
if sys.argv[1:2] == ["agreement"]:
    from services.agreement_cli import main as agreement_main

    sys.exit(agreement_main(sys.argv[1:]))

from services.cli import main  # noqa: E402

sys.exit(main())
