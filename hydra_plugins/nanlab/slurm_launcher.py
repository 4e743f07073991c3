"""nanlab's SLURM launcher, where Hydra looks for plugins (it instantiates a launcher only
from the `hydra_plugins` namespace). `hydra/launcher=slurm` and `slurm_local` name it; the
code is src.sweep.SlurmLauncher. Found when the repository root is on sys.path, as it is for
`python -m src.train` there (make, the tests) and in the SLURM jobs, which start in the
directory the sweep was submitted from."""
from src.sweep import SlurmLauncher as _SlurmLauncher


class SlurmLauncher(_SlurmLauncher):
    """Hydra's submitit SLURM launcher, made to survive SLURM: see src.sweep.SlurmLauncher."""
