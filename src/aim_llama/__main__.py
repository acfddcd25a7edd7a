"""`python -m aim_llama` is the `aim-llama` command."""

from .cli import main

raise SystemExit(main())
