"""Run the ``mirrorflow`` command with ``python -m mirrorflow``."""

from mirrorflow.cli import main

raise SystemExit(main())
