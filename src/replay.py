"""`python -m src.replay <run dir>`: runs `nanlab.replay` (the code lives there)."""

import sys

from nanlab.replay import main

if __name__ == "__main__":
    sys.exit(main())
