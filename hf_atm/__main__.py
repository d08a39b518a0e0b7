"""``python -m hf_atm ...`` runs the ``hf-atm`` console script."""

import sys

from hf_atm.cli import main

if __name__ == "__main__":
    sys.exit(main())
