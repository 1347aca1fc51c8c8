"""Entry point of `python -m demos`."""

from demos.cli import main

raise SystemExit(main())
