"""``python -m ocdwrap``: the same command line as the ``ocdwrap`` console script."""

from .cli import main

raise SystemExit(main())
