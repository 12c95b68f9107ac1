"""Every exception and warning class of the package.

Every error is a ``ValueError`` subclass whose message names the problem and how to fix it, so callers that
catch ``ValueError`` keep working while callers that care can catch the precise class. Misuse of an object's
state (not a bad value) is a :class:`StateError`, which is also a ``RuntimeError``.
"""

from __future__ import annotations

# --- errors ---------------------------------------------------------------------------------------------------------


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


class LayerFiringError(RepsimError):
    """A requested layer never ran during a forward pass, or ran a different number of times than expected."""


class MemoryBudgetError(RepsimError):
    """The chosen estimator or measure needs more memory than the budget allows."""


class ModelForwardError(RepsimError):
    """The model raised on the inputs it was given (wrong dtype, shape or keys for it); the original error is
    chained as ``__cause__``."""


class ResumeStateError(RepsimError):
    """A resume state file (``compare(resume_from=...)``) that cannot continue this run: saved from other data,
    models, layers or settings, or damaged; the message names the file and what differs."""


class StateError(RepsimError, RuntimeError):
    """An object was used in a state that does not allow the call (not a bad value): ``update`` after
    ``all_reduce``, ``all_reduce`` without a process group, entering an active capture twice, ...

    Also a ``RuntimeError``, and a :class:`RepsimError` so that callers catching the package's errors see it.
    """


# --- warnings -------------------------------------------------------------------------------------------------------


class RepsimWarning(UserWarning):
    """Base class of the package's warnings."""


class SmallSampleBiasWarning(RepsimWarning):
    """Biased CKA is inflated because the number of features is comparable to the number of samples."""


class TrivialCorrelationWarning(RepsimWarning):
    """Too few samples for the dimensions: canonical correlations (or a regression fit) are forced to 1.

    With n samples the centered data live in an (n-1)-dimensional space; two column spaces of ranks r_x and
    r_y share at least ``r_x + r_y - (n - 1)`` directions whatever the data, and those canonical correlations
    are exactly 1 (all of them once ``p >= n - 1``). Use more samples, or reduce the dimension first (SVCCA).

    ``determined`` is False when the value is not even a function of the data (PWCCA with two or more tied forced
    correlations: its weights follow the SVD's basis of the tied variates), so code can tell the cases apart without
    reading the message.
    """

    def __init__(self, message: str, *, determined: bool = True) -> None:
        super().__init__(message)
        self.determined = determined

    def __reduce__(self) -> tuple[object, ...]:  # keep ``determined`` through pickling (worker processes)
        return (_trivial_correlation_warning, (str(self), self.determined))


def _trivial_correlation_warning(message: str, determined: bool) -> TrivialCorrelationWarning:
    return TrivialCorrelationWarning(message, determined=determined)


class PluginLoadWarning(RepsimWarning):
    """A third-party measure plugin could not be loaded; the rest of the registry still works."""


class EstimatorChoiceWarning(RepsimWarning):
    """``estimator="auto"`` chose an approximate estimator (minibatch CKA) because the exact one does not fit."""


class SeenEvaluationDataWarning(RepsimWarning):
    """``shift`` judged itself on a part of ``data`` that the original model classifies without a single error.

    Such samples were most likely in the model's training data: there the output checks (agreement, accuracy)
    stay near perfect while accuracy on inputs the model never saw can fall. Pass ``eval_data=`` / ``eval_labels=``
    from data the model was not trained on.
    """


class TargetNotReachedWarning(RepsimWarning):
    """``shift`` returned a state whose measure is farther from the target than ``target_tolerance``.

    The message says how close the run got while keeping the outputs and what to try (more steps, a larger
    ``target_tolerance``, ``mode="perturbation"``); ``ShiftResult.reached`` is False.
    """
