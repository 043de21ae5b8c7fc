"""``python -m megalodon_lite COMMAND``: the same as the ``megalodon-lite`` console script."""

from megalodon_lite.cli import main

raise SystemExit(main())
