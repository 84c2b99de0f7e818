"""`python -m app_dist.experiment`: the same as `app-dist experiment`."""

import sys

from app_dist.experiment import main

sys.exit(main())
