"""captum-native classes: representation similarity with captum's shapes and verbs.

Each class takes captum's constructor ``(forward_func, layer)`` with module objects, batch-first inputs (a tensor or
a tuple of tensors) and ``additional_forward_args``, and uses captum's public API only:

- :class:`LayerSimilarity` ``.compare(inputs, other)``: a layer x layer :class:`~repsim_plugin.SimilarityMap`,
  the same numbers as :func:`repsim_plugin.compare` on the same rows.
- :class:`RepresentationShift` ``.perturb(inputs)``: a :class:`captum.robust.Perturbation` that moves a layer's
  representation toward a target similarity to the clean batch's while the predictions stay; it runs in
  :class:`captum.robust.AttackComparator` (with :meth:`RepresentationShift.metric`) and in
  :class:`captum.robust.MinParamPerturbation` (with :meth:`RepresentationShift.still_similar`).
- :class:`AttributionSimilarity` ``.compare(inputs, **attribute_kwargs)`` and :func:`attribution_change`: how
  alike two models' captum attributions are, one row per sample.

Hooks are removed on every path (they belong to :func:`repsim_plugin.capture`); models are never modified.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from captum.attr import IntegratedGradients
from captum.robust import Perturbation
from torch import nn

from ._captum_layers import CaptumLayers, as_tuple
from ._utils.batches import train_flags_kept
from ._utils.checks import Choice, Float, Int, Optional, check_params
from .errors import NonFiniteInputError, RepsimError
from .measures import Measure, make
from .results import SimilarityMap, state_dict_fingerprint

__all__ = [
    "AttributionSimilarity",
    "LayerSimilarity",
    "RepresentationShift",
    "ShiftMetrics",
    "ShiftOutput",
    "attribution_change",
]


# --- LayerSimilarity -----------------------------------------------------------------------------------------------


def _fingerprint(forward_func: Any) -> str | None:
    return state_dict_fingerprint(forward_func) if isinstance(forward_func, nn.Module) else None


class LayerSimilarity:
    """Similarity of what captum-style ``layer`` modules compute: ``LayerSimilarity(model, [model.l1, model.l2])``.

    ``capture_options`` (``tokens=``, ``spatial=``, ``output=``, ``layout=``, ``device=``, ``eval_mode=``) go to
    :func:`repsim_plugin.capture`, whose hooks are removed on every path.
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: nn.Module | Sequence[nn.Module],
        measure: str | Measure = "cka",
        **capture_options: Any,
    ) -> None:
        self.measure = make(measure)
        self._layers = CaptumLayers(forward_func, layer, capture_options)
        self.forward_func = forward_func

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers inside ``forward_func`` (class names where it is a plain function)."""
        return list(self._layers.names)

    def rows(
        self, inputs: Any, additional_forward_args: Any = None, attribute_to_layer_input: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{layer name: (n, d) rows}`` for one batch (a layer's input instead with ``attribute_to_layer_input``)."""
        with torch.no_grad():
            rows, _ = self._layers.run(inputs, additional_forward_args, layer_input=attribute_to_layer_input)
        return {k: v.detach() for k, v in rows.items()}

    def compare(
        self,
        inputs: Any,
        other: LayerSimilarity | None = None,
        *,
        other_inputs: Any = None,
        additional_forward_args: Any = None,
        other_additional_forward_args: Any = None,
        attribute_to_layer_input: bool = False,
    ) -> SimilarityMap:
        """Layer x layer map of these layers against ``other``'s (None: against themselves) on the same samples.

        ``other_inputs`` feeds ``other`` its own encoding of the same samples (another tokenizer); rows must
        match in number. Values equal :func:`repsim_plugin.compare` on the same rows.
        """
        rows_a = self.rows(inputs, additional_forward_args, attribute_to_layer_input)
        target = self if other is None else other
        if other is None and other_inputs is None:
            rows_b = rows_a
        else:
            rows_b = target.rows(
                inputs if other_inputs is None else other_inputs,
                additional_forward_args if other_additional_forward_args is None else other_additional_forward_args,
                attribute_to_layer_input,
            )
        values = torch.tensor(
            [[float(self.measure(a, b).detach()) for b in rows_b.values()] for a in rows_a.values()],
            dtype=torch.float64,
        )
        options = self._layers.capture_options
        return SimilarityMap(
            values=values,
            layers_a=list(rows_a),
            layers_b=list(rows_b),
            measure=self.measure.id,
            estimator="captured",
            reduction={
                "tokens": options.get("tokens", "mean"),
                "spatial": options.get("spatial", "flatten"),
                "attribute_to_layer_input": attribute_to_layer_input,
            },
            n=int(next(iter(rows_a.values())).shape[0]),
            dtype="float64",
            fingerprints={"a": _fingerprint(self.forward_func), "b": _fingerprint(target.forward_func)},
            extra={"model_a": type(self.forward_func).__name__, "model_b": type(target.forward_func).__name__},
        )


# --- RepresentationShift -------------------------------------------------------------------------------------------


class ShiftOutput(NamedTuple):
    """What :meth:`RepresentationShift.forward_with_rows` returns: the model output and the layer's rows."""

    output: torch.Tensor
    rows: torch.Tensor


class ShiftMetrics(NamedTuple):
    """Per-batch metrics for :class:`captum.robust.AttackComparator`."""

    accuracy: torch.Tensor  # (b,) prediction == label (NaN without labels)
    agreement: torch.Tensor  # (b,) prediction == the clean input's prediction
    similarity: torch.Tensor  # (1,) the measure between the layer's rows and the clean batch's


SHIFT_PARAMS = {
    "epsilon": Float(positive=True),
    "steps": Int(minimum=1),
    "norm": Choice(("linf", "l2")),
    "keep_weight": Float(minimum=0),
    "step_size": Optional(Float(positive=True)),
    "target": Float(),
}


class RepresentationShift(Perturbation):
    """A :class:`captum.robust.Perturbation` that moves ``layer``'s representation toward ``target`` similarity to
    the clean batch's within an ``epsilon`` ball (``norm`` "linf" or "l2", per sample) while predictions stay.

    Projected signed-gradient descent on ``(measure(rows(x'), rows(x)) - target)^2 + keep_weight *
    cross_entropy(f(x'), f(x).argmax())`` for ``steps`` steps; it returns the iterate closest to ``target`` among
    those that keep every prediction (the clean batch itself when none does). ``lower_bound`` / ``upper_bound``
    bound the inputs' values when given (e.g. 0 and 1 for images).
    """

    def __init__(
        self,
        forward_func: Callable[..., Any],
        layer: nn.Module,
        measure: str | Measure = "cka",
        target: float = 0.5,
        epsilon: float = 0.1,
        steps: int = 20,
        norm: str = "linf",
        *,
        step_size: float | None = None,
        keep_weight: float = 1.0,
        lower_bound: float | None = None,
        upper_bound: float | None = None,
        **capture_options: Any,
    ) -> None:
        check_params(SHIFT_PARAMS, epsilon=epsilon, steps=steps, norm=norm, keep_weight=keep_weight,
                     step_size=step_size, target=target)  # fmt: skip
        self.measure = make(measure)
        if not self.measure.differentiable:
            raise RepsimError(f"{self.measure.id} is not differentiable; RepresentationShift needs e.g. 'cka'.")
        self.measure.check_target(target)
        self.forward_func = forward_func
        self._layers = CaptumLayers(forward_func, [layer], capture_options)
        self.target, self.epsilon, self.steps, self.norm = float(target), float(epsilon), int(steps), norm
        self.step_size, self.keep_weight = step_size, float(keep_weight)
        self.bounds = (lower_bound, upper_bound)

    # -- forward helpers for captum's comparators -----------------------------------------------------------------
    def forward_with_rows(self, inputs: torch.Tensor, *additional_forward_args: Any) -> ShiftOutput:
        """``forward_func`` output plus the layer's rows: the ``forward_func`` to give the comparators."""
        with torch.no_grad():
            rows, out = self._layers.run(inputs, additional_forward_args)
        return ShiftOutput(out, next(iter(rows.values())))

    def metric(self, model_out: ShiftOutput, *, clean: torch.Tensor, target: Any = None) -> ShiftMetrics:
        """AttackComparator metric: accuracy (with ``target`` labels), agreement with and similarity to ``clean``."""
        reference = self.forward_with_rows(clean)
        pred = model_out.output.argmax(dim=-1)
        agreement = (pred == reference.output.argmax(dim=-1)).double()
        accuracy = (
            (pred == torch.as_tensor(target, device=pred.device)).double()
            if target is not None
            else torch.full_like(agreement, float("nan"))
        )
        similarity = self.measure(model_out.rows, reference.rows).detach().reshape(1)
        return ShiftMetrics(accuracy, agreement, similarity)

    def still_similar(
        self, model_out: ShiftOutput, *, clean: torch.Tensor, threshold: float, min_agreement: float = 1.0
    ) -> bool:
        """MinParamPerturbation ``correct_fn``: False once the similarity to ``clean`` is past ``threshold`` with at
        least ``min_agreement`` of the predictions kept (the perturbation then "succeeded")."""
        reference = self.forward_with_rows(clean)
        value = float(self.measure(model_out.rows, reference.rows).detach())
        agreement = float((model_out.output.argmax(-1) == reference.output.argmax(-1)).double().mean())
        past = value < threshold if self.measure.larger_is_more_similar else value > threshold
        return not (past and agreement >= min_agreement)

    # -- the perturbation -----------------------------------------------------------------------------------------
    def _project(self, x: torch.Tensor, x_adv: torch.Tensor, epsilon: float) -> torch.Tensor:
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-epsilon, epsilon)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
            delta = delta * (epsilon / norms).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
        out = x + delta
        low, high = self.bounds
        if low is not None or high is not None:
            out = out.clamp(low, high)
        return out

    def _step(self, grad: torch.Tensor, alpha: float) -> torch.Tensor:
        if self.norm == "linf":
            return alpha * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-30)
        return alpha * grad / norms.view(-1, *([1] * (grad.dim() - 1)))

    def perturb(
        self,
        inputs: torch.Tensor,
        epsilon: float | None = None,
        steps: int | None = None,
        target: float | None = None,
        additional_forward_args: Any = None,
    ) -> torch.Tensor:
        """Perturbed inputs (same shape) within ``epsilon`` whose layer rows move toward ``target`` similarity
        to the clean batch's rows, predictions kept. Arguments override the constructor's for this call."""
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise RepsimError("RepresentationShift perturbs one floating-point input tensor (batch first).")
        eps = self.epsilon if epsilon is None else float(epsilon)
        n_steps = self.steps if steps is None else int(steps)
        goal = self.target if target is None else float(target)
        check_params(SHIFT_PARAMS, epsilon=eps, steps=n_steps, target=goal)
        alpha = self.step_size if self.step_size is not None else 2.5 * eps / n_steps
        x = inputs.detach()
        with torch.no_grad():
            clean_rows, clean_out = self._layers.run(x, additional_forward_args)
        reference = next(iter(clean_rows.values())).detach()
        if not isinstance(clean_out, torch.Tensor) or clean_out.dim() != 2:
            raise RepsimError(
                "RepresentationShift keeps predictions, so forward_func must return (batch, classes) logits; got "
                f"{type(clean_out).__name__}. Wrap the model, e.g. lambda x: model(x).logits."
            )
        labels = clean_out.argmax(dim=-1)
        best, best_gap = x.clone(), abs(float(self.measure(reference, reference)) - goal)
        x_adv = x.clone()
        for step in range(n_steps + 1):
            x_adv.requires_grad_(True)
            rows, out = self._layers.run(x_adv, additional_forward_args, grad=True)
            value = self.measure(next(iter(rows.values())), reference)
            gap = abs(float(value.detach()) - goal)
            if gap < best_gap and bool((out.argmax(dim=-1) == labels).all()):
                best, best_gap = x_adv.detach().clone(), gap
            if step == n_steps:
                break
            loss = (value - goal) ** 2 + self.keep_weight * nn.functional.cross_entropy(out, labels)
            (grad,) = torch.autograd.grad(loss, x_adv)
            with torch.no_grad():
                x_adv = self._project(x, x_adv.detach() - self._step(grad, alpha), eps)
        return best.to(inputs.dtype)


# --- attributions --------------------------------------------------------------------------------------------------


def _attribution_rows(attributions: Any, name: str) -> torch.Tensor:
    parts = [a.detach().reshape(a.shape[0], -1) for a in as_tuple(attributions)]
    if not parts:
        raise RepsimError(f"the attribution method of {name} returned nothing.")
    rows = torch.cat(parts, dim=1).to(torch.float64)
    if not bool(torch.isfinite(rows).all()):
        raise NonFiniteInputError(
            f"the attributions of {name} contain NaN or Inf ({int((~torch.isfinite(rows)).any(1).sum())} of "
            f"{rows.shape[0]} samples): check that the inputs are finite and the model's outputs do not overflow "
            "(e.g. run it in float32 rather than float16)."
        )
    return rows


def _explain(method: Any, inputs: Any, kwargs: dict[str, Any], name: str) -> torch.Tensor:
    """``method``'s attribution rows, its model in eval mode meanwhile (explanations are of the model at inference;
    in train mode every forward would update its batch-norm statistics), every flag restored afterwards."""
    model = getattr(method, "forward_func", None)
    if not isinstance(model, nn.Module):
        return _attribution_rows(method.attribute(inputs, **kwargs), name)
    with train_flags_kept(model):
        return _attribution_rows(method.attribute(inputs, **kwargs), name)


class AttributionSimilarity:
    """How alike two captum attribution methods' explanations are (e.g. ``IntegratedGradients`` of two models or
    two checkpoints): one row per sample (its attribution map flattened), compared with ``measure``."""

    def __init__(self, attribution_a: Any, attribution_b: Any, measure: str | Measure = "cka") -> None:
        for name, method in (("attribution_a", attribution_a), ("attribution_b", attribution_b)):
            if not callable(getattr(method, "attribute", None)):
                raise RepsimError(f"{name} must be a captum attribution instance (e.g. IntegratedGradients(model)).")
        self.attribution_a, self.attribution_b = attribution_a, attribution_b
        self.measure = make(measure)

    def rows(self, inputs: Any, **attribute_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The (n, d) attribution rows of both methods on the same inputs."""
        for x in as_tuple(inputs):
            if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).sum())
                raise NonFiniteInputError(
                    f"the inputs to explain contain NaN or Inf ({bad} of {x.shape[0]} samples); attributions of "
                    "such inputs mean nothing. Drop those samples or find where they come from."
                )
        rows_a = _explain(self.attribution_a, inputs, attribute_kwargs, "attribution_a")
        rows_b = _explain(self.attribution_b, inputs, attribute_kwargs, "attribution_b")
        return rows_a, rows_b

    def compare(self, inputs: Any, **attribute_kwargs: Any) -> float:
        """``measure`` between the two methods' attributions of ``inputs`` (``attribute_kwargs`` go to both)."""
        rows_a, rows_b = self.rows(inputs, **attribute_kwargs)
        return float(self.measure(rows_a, rows_b).detach())


def attribution_change(
    model_a: Callable[..., Any],
    model_b: Callable[..., Any],
    inputs: Any,
    attribution: Callable[[Any], Any] = IntegratedGradients,
    target: Any = None,
    measure: str | Measure = "cka",
    **attribute_kwargs: Any,
) -> float:
    """Similarity of ``model_a``'s and ``model_b``'s ``attribution`` (a captum class) on the same ``inputs``.

    ``target`` as in captum; None explains, for both models, the class ``model_a`` predicts for each input (for
    (batch, classes) outputs). 1 for a model with itself (deterministic methods); the models are not modified.
    """
    if not isinstance(attribution, type):
        raise RepsimError(
            f"attribution must be a captum attribution class such as captum.attr.IntegratedGradients (the class, "
            f"not an instance), got {type(attribution).__name__}."
        )
    if target is None:
        with torch.no_grad(), train_flags_kept(model_a) if isinstance(model_a, nn.Module) else contextlib.nullcontext():
            out = model_a(*as_tuple(inputs), *as_tuple(attribute_kwargs.get("additional_forward_args")))
        if isinstance(out, torch.Tensor) and out.dim() == 2:
            target = out.argmax(dim=1)
    similarity = AttributionSimilarity(attribution(model_a), attribution(model_b), measure)
    return similarity.compare(inputs, target=target, **attribute_kwargs)
