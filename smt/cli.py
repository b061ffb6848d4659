"""Old import path of :mod:`smt.lightning.cli` (was ``smt.cli``): re-exports only.

Existing imports, YAML class paths and checkpoints keep loading; new code uses the new path (README).
"""

import sys

from smt.lightning.cli import COMMANDS, RUN_ERRORS, SMTCLI, USAGE_ERRORS, command_help, main, run_lightning, run_select

__all__ = [
    "COMMANDS",
    "RUN_ERRORS",
    "SMTCLI",
    "USAGE_ERRORS",
    "command_help",
    "main",
    "run_lightning",
    "run_select",
]

if __name__ == "__main__":  # `python -m smt.cli ...`
    sys.exit(main())
