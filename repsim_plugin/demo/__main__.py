"""``python -m repsim_plugin.demo``: the tour of :mod:`repsim_plugin.demo`."""

from . import main

raise SystemExit(main())
