"""Sweeps: the progress callback (progress.py), SLURM task states (slurm.py) and Hydra's
BasicSweeper in one place (basic.py); the Hydra plugins in hydra_plugins/ build on these."""
