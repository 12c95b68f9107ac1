"""Exceptions and warnings.

Every error is a ``ValueError`` subclass whose message names the problem and how to fix it, so callers that
catch ``ValueError`` keep working while callers that care can catch the precise class.
"""

from __future__ import annotations


class RepsimError(ValueError):
    """Base class of every error raised for bad input."""


class InputShapeError(RepsimError):
    """An input has the wrong number of dimensions, or two inputs disagree on the number of samples."""


class InputDtypeError(RepsimError):
    """An input has a dtype the measures cannot use (integer, boolean, complex)."""


class NonFiniteInputError(RepsimError):
    """An input contains NaN or Inf."""


class DegenerateInputError(RepsimError):
    """An input makes the measure undefined, for example a representation with zero variance."""


class TooFewSamplesError(RepsimError):
    """Fewer samples than the measure or estimator needs."""


class UnknownNameError(RepsimError):
    """An unknown measure, layer or option name; the message lists the closest known names."""


class RepsimWarning(UserWarning):
    """Base class of the package's warnings."""


class SmallSampleBiasWarning(RepsimWarning):
    """Biased CKA is inflated because the number of features is comparable to the number of samples."""


class PluginLoadWarning(RepsimWarning):
    """A third-party measure plugin could not be loaded; the rest of the registry still works."""


class EstimatorChoiceWarning(RepsimWarning):
    """``estimator="auto"`` chose an approximate estimator (minibatch CKA) because the exact one does not fit."""


class MemoryBudgetError(RepsimError):
    """The chosen estimator or measure needs more memory than the budget allows."""
