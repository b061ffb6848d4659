"""``python -m smt``: the ``smt`` command without the console script (see ``smt.lightning.cli``)."""

import sys

from smt.lightning.cli import main

sys.exit(main())
