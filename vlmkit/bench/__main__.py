"""``python -m vlmkit.bench``: the same as ``vlmkit bench``."""

import sys

from .run import main

sys.exit(main())
