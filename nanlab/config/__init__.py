"""Settings: every key's spec and default (specs.py), each axis's options (options.py), and
Hydra's side of the entry points (compose.py: schemas, the command-line check, config -> specs).
specs.py and options.py import no torch, so a typo is refused in a fraction of a second."""
