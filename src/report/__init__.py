"""`python -m src.report`: runs `nanlab.report` (the code lives there)."""
