"""W&B sweeps over the NaN map: the sweep files, their generator (make_grid) and the
wrapper each run calls (run_cell). Only YAML and Hydra here: no torch."""
