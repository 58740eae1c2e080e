"""`python -m data_prep <subcommand>`; see `data_prep/cli.py` for the list and how to add one."""

import sys

from data_prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
