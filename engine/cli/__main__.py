"""``python -m cmiguard.cli``: the same as the ``cmiguard`` command."""

import sys

from cmiguard.cli import main

sys.exit(main())
