"""``python -m fastlm``: the same command line as the ``fastlm`` script."""

import sys

from .cli import main

sys.exit(main())
