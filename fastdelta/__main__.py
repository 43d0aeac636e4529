"""`python -m fastdelta`: the `fastdelta` command (see fastdelta.cli)."""

import sys

from fastdelta.cli import main

sys.exit(main())
