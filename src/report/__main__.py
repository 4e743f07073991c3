"""`python -m src.report <dirs>`: runs `python -m nanlab.report` (the code lives there)."""

import sys

from nanlab.report.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
