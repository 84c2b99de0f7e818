"""Ray Tune sweep over distributed app-dist trials: the thin script `ray submit` ships.

    python launch/sweep.py --config configs/sweep_digits.yaml [key=value ...]
    RAY_ADDRESS=head:6379 python launch/sweep.py --config configs/sweep_cifar10.yaml
    ray submit cluster.yaml launch/sweep.py -- --config configs/sweep_cifar10.yaml

The logic lives in app_dist.sweep (installed on every node by cluster.yaml's
setup_commands); relative paths are resolved against the app-dist checkout.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run from a checkout without `pip install -e .`
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "app_dist").is_dir():
        sys.path.insert(0, str(checkout))

from app_dist.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
