"""``python -m fastclr``: the same command line as the ``fastclr`` script."""
import sys

from .cli import main

sys.exit(main())
