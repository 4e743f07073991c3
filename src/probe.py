"""`python -m src.probe`: runs `nanlab.probe` (the code lives there)."""

from nanlab.probe import main

if __name__ == "__main__":
    main()
