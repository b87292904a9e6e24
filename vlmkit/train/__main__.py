"""``python -m vlmkit.train --config recipe.json --out DIR [--resume]`` (same as ``vlmkit train``)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
