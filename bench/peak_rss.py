"""app_dist/train.py, then this rank's peak resident memory written to $APP_DIST_RSS_DIR.

    torchrun --nproc_per_node 2 bench/peak_rss.py --config ... [key=value ...]

Used by bench/scaling.py: ru_maxrss of the training process itself (RUSAGE_SELF) and of its
finished children (its DataLoader workers, RUSAGE_CHILDREN), per rank.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app_dist.train import main  # noqa: E402

if __name__ == "__main__":
    code = main(sys.argv[1:])
    folder = Path(os.environ["APP_DIST_RSS_DIR"])
    rank = int(os.environ.get("RANK", "0"))
    (folder / f"rank-{rank}.json").write_text(json.dumps({
        "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))
    sys.exit(code)
