"""``python -m repsim_plugin.cli``: the ``repsim`` command."""

import sys

from . import main

sys.exit(main())
