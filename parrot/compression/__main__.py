"""``python -m parrot.compression FILE ...``: see :mod:`parrot.compression.cli`."""

from parrot.compression.cli import main

raise SystemExit(main())
