"""`python -m app_dist.data.shards`: the shard writer's documented entry point (the writer
itself lives with the rest of offline data preparation, in app_dist/data/prepare/)."""

import sys

from app_dist.data.prepare.shards import main

if __name__ == "__main__":
    sys.exit(main())
