"""`python -m src.train`: runs `nanlab.train` (the code lives there)."""

from nanlab.train import main

if __name__ == "__main__":
    main()
