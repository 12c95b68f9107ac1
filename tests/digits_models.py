"""The digits models the tests share: re-exported from :mod:`repsim_plugin.digits` (the demo's embedded default).

Test files in ``tests/`` import it as ``from digits_models import ...``: pytest's default ``prepend`` import mode puts
the directory of each test file (``tests/``, which has no ``__init__.py``) on ``sys.path``.
"""

from repsim_plugin.digits import (  # noqa: F401
    PENULTIMATE,
    Split,
    accuracy,
    build_digits_cnn,
    build_digits_mlp,
    hidden,
    load_digits_split,
    train_digits_cnn,
    train_digits_mlp,
)
