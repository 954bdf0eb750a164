"""`python -m tune`: see tune/cli.py."""

from tune.cli import main

raise SystemExit(main())
