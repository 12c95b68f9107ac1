"""The shift's objective: the minibatch measure (pair and map form), log-cosh, and the output-preservation losses.

The objective is the paper's (Davari et al., ICLR 2023, Section 4.3)::

    preservation(student outputs, original outputs)  +  lambda * mean log-cosh(M - M_target)

``M`` is computed on every minibatch and differentiated end to end. A measure that declares a ``"minibatch"``
estimator (the CKA family: minibatch CKA, Nguyen et al. 2021) is optimised through that estimator's kernel with
the unbiased HSIC (Song et al. 2012); any other differentiable measure is applied to the minibatch rows itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812

from .._utils.warnings import warn
from ..adapters import Adapter
from ..capture import reduce_output
from ..errors import RepsimError, UnknownNameError
from ..measures import Measure, list_measures, make
from ..measures.kernels import KERNELS, NULL_BIAS_WARNING, cka_from_hsic, expected_null_cka, hsic_unbiased

__all__ = [
    "PRESERVE",
    "TOKEN_STATES_MAX",
    "MinibatchMeasure",
    "OutputChecks",
    "QuietMeasure",
    "differentiable_measure",
    "effective_dimension",
    "evaluation_measure",
    "log_cosh",
    "preservation_loss",
    "preserved_output",
    "token_loss",
    "token_states",
]

#: Output-preservation losses: distillation KL at temperature T, cross-entropy on labels, 1 - cosine of the
#: outputs (sentence embeddings), squared error of the outputs relative to their mean square.
PRESERVE: tuple[str, ...] = ("kl", "ce", "embedding", "mse")


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """``log(cosh(x))`` without overflow: ``|x| + log1p(exp(-2|x|)) - log 2``."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2.0 * a)) - math.log(2.0)


def differentiable_measure(measure: str | Measure) -> Measure:
    """The measure, or a clear error naming differentiable ones when it cannot be optimised by gradient descent."""
    m = make(measure)
    if not m.differentiable:
        usable = [mid for mid in list_measures() if make(mid).differentiable]
        aliases = sorted({a for mid in usable for a in make(mid).aliases})
        raise RepsimError(
            f"{m.id} is not differentiable (rank- or neighbour-based), so it cannot be optimised by gradient "
            f"descent. Shift a differentiable measure, e.g. {', '.join(aliases[:10])} (see `repsim measures`)."
        )
    return m


class MinibatchMeasure:
    """The differentiable per-minibatch estimate of a measure that the objective drives toward the target.

    A measure declaring a ``"minibatch"`` estimator whose options name a kernel (the CKA family): CKA with that
    kernel and the unbiased HSIC (minibatch CKA, Nguyen et al. 2021, on one batch), whatever HSIC the measure
    itself uses (the biased estimator is inflated at batch sizes). Any other differentiable measure: the measure
    itself on the minibatch rows.
    """

    def __init__(self, measure: Measure) -> None:
        self.measure = measure
        declared = measure.estimators.get("minibatch")
        options = dict(declared.options) if declared is not None else {}
        self.gram: Callable[..., torch.Tensor] | None = None
        if "kernel" in options:
            kernel_name = str(options.pop("kernel"))
            if kernel_name not in KERNELS:
                raise UnknownNameError(f"unknown CKA kernel {kernel_name!r} in {measure.id}.")
            self.kernel_params = options
            self.gram = KERNELS[kernel_name]
            self.description = f"minibatch CKA (kernel={kernel_name}, unbiased HSIC)"
        else:
            self.description = f"{measure.id} on each minibatch"

    def grams(self, X: torch.Tensor) -> torch.Tensor:
        assert self.gram is not None
        return self.gram(X.to(torch.float64), **self.kernel_params)

    def pair(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        if self.gram is not None:
            K, L = self.grams(X), self.grams(Y)
            return cka_from_hsic(hsic_unbiased(K, L), hsic_unbiased(K, K), hsic_unbiased(L, L))
        return self.measure(X.to(torch.float64), Y.to(torch.float64))

    def map(self, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        L = len(rows)
        if self.gram is not None:
            grams = [self.grams(X) for X in rows]
            self_hsic = [hsic_unbiased(K, K) for K in grams]
            entries = [
                [
                    torch.ones((), dtype=torch.float64, device=grams[i].device)
                    if i == j
                    else cka_from_hsic(hsic_unbiased(grams[i], grams[j]), self_hsic[i], self_hsic[j])
                    for j in range(L)
                ]
                for i in range(L)
            ]
        else:
            entries = [[self.pair(rows[i], rows[j]) for j in range(L)] for i in range(L)]
        return torch.stack([torch.stack(row) for row in entries])


def effective_dimension(X: torch.Tensor) -> float:
    """The participation ratio ``(sum l)^2 / sum l^2`` of the centred rows' covariance eigenvalues ``l``.

    The number of directions the rows really spread over (nominal features overstate it: a layer of 384 units
    whose rows lie near 20 directions behaves, for CKA's bias, like 20 features)."""
    Xc = X.to(torch.float64)
    Xc = Xc - Xc.mean(0)
    gram = Xc @ Xc.T if Xc.shape[0] <= Xc.shape[1] else Xc.T @ Xc  # same non-zero eigenvalues
    eigenvalues = torch.linalg.eigvalsh(gram).clamp(min=0)
    total = float(eigenvalues.square().sum())
    return float(eigenvalues.sum()) ** 2 / total if total > 0 else 0.0


#: Fewer evaluation samples than this keep the measure asked for: there the unbiased HSIC estimates of debiased
#: CKA can be negative (the ratio undefined) and their variance outweighs the bias they remove.
DEBIASED_MIN_SAMPLES = 20


def evaluation_measure(measure: Measure, rows: torch.Tensor, reference: torch.Tensor) -> tuple[Measure, str]:
    """The measure the evaluations use for ``rows`` against ``reference``, and why when it is not ``measure``.

    Biased linear CKA (``hsic=gretton``) of n rows is inflated by chance when n is small against the dimensions
    the rows span: independent features of that shape already score about ``sqrt(pq / ((n+p)(n+q)))``
    (:func:`~repsim_plugin.measures.kernels.expected_null_cka`, with p, q the effective dimensions). When that
    chance level exceeds :data:`~repsim_plugin.measures.kernels.NULL_BIAS_WARNING` (e.g. 40 held-out sentences of
    a transformer block), the evaluations, early stopping, ``keep="best"`` and ``reached`` use debiased linear CKA
    (unbiased HSIC, the estimator the optimiser's minibatch value also uses); the result names it and also
    reports the biased value. Any other measure, and fewer than :data:`DEBIASED_MIN_SAMPLES` samples, keep the
    measure asked for."""
    params = dict(measure.params)
    if not measure.id.startswith("cka-") or params.get("kernel") != "linear" or params.get("hsic") != "gretton":
        return measure, ""
    n = rows.shape[0]
    if n < DEBIASED_MIN_SAMPLES:
        return measure, ""
    p, q = effective_dimension(rows), effective_dimension(reference)
    chance = expected_null_cka(n, max(1, round(p)), max(1, round(q)))
    if chance <= NULL_BIAS_WARNING:
        return measure, ""
    reason = (
        f"debiased: {n} evaluation samples against {p:.0f} / {q:.0f} effective dimensions, where biased CKA of "
        f"independent features is already about {chance:.2f}"
    )
    return make("cka", kernel="linear", hsic="song"), reason


class QuietMeasure:
    """The full-data measure of the evaluations; its warnings (the same at every evaluation) are collected and
    issued once, by :meth:`reissue`, pointing at the caller."""

    def __init__(self, measure: Measure) -> None:
        self.measure = measure
        self.caught: dict[tuple[type[Warning], str], None] = {}

    def __call__(self, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = self.measure(X, Y)
        for warning in caught:
            self.caught.setdefault((warning.category, str(warning.message)), None)
        return value

    def reissue(self) -> None:
        for category, message in self.caught:
            warn(message, category)


# --- output preservation --------------------------------------------------------------------------------------


def preserved_output(
    adapter: Adapter, raw: Any, inputs: Any, output: Callable[[Any], torch.Tensor] | None, preserve: str
) -> torch.Tensor:
    """The (batch, k) tensor the preservation loss compares: logits, or mean-pooled token states."""
    if output is not None:
        tensor = output(raw)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise RepsimError("output= must map the model's output to a (batch, k) tensor.")
        return tensor
    tensor = adapter.main_output(raw)
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 3 and preserve in ("embedding", "mse"):
        # a bare encoder: the sentence embedding is the attention-mask-aware mean of the last hidden state
        return reduce_output(tensor, "NLC", tokens="mean", mask=adapter.attention_mask(inputs))
    if tensor.dim() == 3:
        raise RepsimError(
            f"the model's main output has shape {tuple(tensor.shape)} (token states, not (batch, classes) logits), "
            f"so preserve={preserve!r} does not apply. For an encoder without a head pass preserve='embedding' "
            "(mean-pooled outputs keep their direction) or 'mse'; for token logits pass output=<callable> that "
            "returns (batch, k)."
        )
    raise RepsimError(
        f"the model's main output has shape {tuple(tensor.shape)}; pass output=<callable> returning (batch, k)."
    )


def preservation_loss(
    preserve: str, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, temperature: float
) -> torch.Tensor:
    """The loss that keeps the student's outputs where the original's are (see :data:`PRESERVE`)."""
    if preserve == "kl":
        return F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
    if preserve == "ce":
        if labels is None:
            raise RepsimError("preserve='ce' trains on hard labels: pass labels= (or (inputs, labels) batches).")
        return F.cross_entropy(student, labels)
    if preserve == "embedding":
        return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()
    return (student - teacher).square().mean() / teacher.square().mean()


def output_loss(
    preserve: str,
    out: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    tokens: torch.Tensor | None = None,
    teacher_tokens: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole preservation term: :func:`preservation_loss` of the outputs, plus :func:`token_loss` of the
    token states when both the copy's and the original's are given (a bare encoder under ``preserve="embedding"``)."""
    loss = preservation_loss(preserve, out.float(), teacher.float(), labels, temperature)
    if tokens is not None and teacher_tokens is not None:
        loss = loss + token_loss(tokens, teacher_tokens, mask)
    return loss


#: The most token-state values (floats) kept of the original for the token-level preservation loss.
TOKEN_STATES_MAX = 64 * 2**20


def token_states(adapter: Adapter, raw: Any, inputs: Any, preserve: str, output: Any) -> torch.Tensor | None:
    """A bare encoder's (batch, tokens, channels) output under ``preserve="embedding"``, else None."""
    if preserve != "embedding" or output is not None:
        return None
    tensor = adapter.main_output(raw)
    return tensor if tensor.dim() == 3 and adapter.attention_mask(inputs) is not None else None


def token_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean ``1 - cosine`` of the attended tokens' output states: the sentence embedding is their mean, and keeping
    every token's direction constrains the network far more than keeping the mean of each training sentence."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1)
    if mask is None:
        return (1.0 - cos).mean()
    weights = mask.to(cos.device, cos.dtype)
    return ((1.0 - cos) * weights).sum() / weights.sum().clamp(min=1.0)


@dataclass(frozen=True)
class OutputChecks:
    """How close outputs are to the original's on the evaluation data: the numbers "outputs kept" is judged by.

    ``agreement`` (top-1, classifiers), ``kl`` (mean KL(original || outputs) of the softmax at temperature 1),
    ``cosine`` / ``cosine_min`` (mean / smallest cosine), ``accuracy`` (when the evaluation data have labels).
    """

    agreement: float | None
    kl: float | None
    cosine: float
    cosine_min: float
    accuracy: float | None

    @classmethod
    def compare(
        cls, out: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, classify: bool
    ) -> OutputChecks:
        cos = F.cosine_similarity(out.double(), teacher.double(), dim=1)
        agreement = kl = accuracy = None
        if classify:
            agreement = float((out.argmax(1) == teacher.argmax(1)).double().mean())
            kl = float(
                F.kl_div(
                    F.log_softmax(out.double(), 1),
                    F.log_softmax(teacher.double(), 1),
                    log_target=True,
                    reduction="batchmean",
                )
            )
            if labels is not None:
                accuracy = float((out.argmax(1) == labels).double().mean())
        return cls(agreement, kl, float(cos.mean()), float(cos.min()), accuracy)
