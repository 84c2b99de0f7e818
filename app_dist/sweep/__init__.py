"""Ray Tune sweeps over distributed app-dist trials.

    python launch/sweep.py --config configs/sweep_digits.yaml      (or: app-dist sweep ...)

settings.py  the sweep file: schema, search space, validation (no Ray needed)
trial.py     one trial: a Tune function fitting a Ray Train TorchTrainer around app_dist.train
resume.py    a restarted trial: its last reported megabatch checkpoint into the run directory
results.py   the table of trials, best first, as CSV / JSON
local_ray.py the local Ray a sweep starts when no cluster runs (in a session of its own)
runner.py    start or restore the Tune experiment; the command line
"""

from app_dist.sweep.runner import main, run_sweep
from app_dist.sweep.settings import Sweep, load_sweep

__all__ = ["Sweep", "load_sweep", "main", "run_sweep"]
