"""The bad-input matrix: each kind of bad input, through every entry point, meets a clear error or the right result.

One table (``CASES``): each row is a kind of bad input and the call that receives it. The expected outcome is a
``ValueError`` subclass (a :class:`~repsim_plugin.errors.RepsimError`) whose message matches a pattern naming the
problem *and* the fix, or, for inputs that are fine (float16, non-contiguous, requires_grad, a half-precision
model, ...), the correct value. After every row the shared models must be untouched: no hook left on any module,
parameters and buffers bit-identical, every module's train / eval flag and every ``requires_grad`` as before.

The REDTEAM defect classes each have tests of their own below the table (beyond the examples that found them).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from captum.attr import Saliency
from torch import nn

import repsim_plugin as rp
from repsim_plugin import captum as rp_captum
from repsim_plugin import errors
from repsim_plugin.cli import main as cli_main

# --- the shared models (checked after every row) ----------------------------------------------------------------------


class Loop(nn.Module):
    """``lin`` runs once on even batch sizes and twice on odd ones; ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(1 + int(x.shape[0] % 2)):
            x = self.lin(x)
        return x


class Flaky(nn.Sequential):
    """Raises in the middle of its forward on a batch of 3 rows (after the first layer ran)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self[0](x)
        if x.shape[0] == 3:
            raise RuntimeError("device-side failure in layer 1")
        return self[1](h)


class Tokens(nn.Module):
    """(batch, tokens, 8) outputs from a (batch, tokens, 8) input, with an optional attention mask."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(x)


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 6))
    m.train()
    m[3].eval()  # mixed flags: restored exactly, not just "train" or "eval"
    return m


A, B, LOOP, FLAKY, TOKENS = _mlp(0), _mlp(1), Loop(), Flaky(nn.Linear(8, 8), nn.Linear(8, 4)), Tokens()
MODELS = {"A": A, "B": B, "LOOP": LOOP, "FLAKY": FLAKY, "TOKENS": TOKENS}
g = torch.Generator().manual_seed(0)
X = torch.randn(64, 10, generator=g, dtype=torch.float64)
Y = X[:, :6] @ torch.randn(6, 7, generator=g, dtype=torch.float64) + 0.3 * torch.randn(64, 7, generator=g).double()
DATA = [torch.randn(16, 8, generator=g) for _ in range(4)]


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "flags": [m.training for m in model.modules()],
        "grad": [p.requires_grad for p in model.parameters()],
    }


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _untouched(before: dict[str, dict[str, Any]]) -> None:
    for name, model in MODELS.items():
        assert _hooks(model) == 0, f"{name}: hooks left"
        now = _snapshot(model)
        assert now["flags"] == before[name]["flags"], f"{name}: train / eval flags changed"
        assert now["grad"] == before[name]["grad"], f"{name}: requires_grad changed"
        for key, value in before[name]["state"].items():
            assert torch.equal(now["state"][key], value), f"{name}: {key} changed"
    assert torch.is_grad_enabled()


# --- helpers for rows -------------------------------------------------------------------------------------------------


def measure(name: str, *args: Any, **params: Any) -> Callable[[Path], Any]:
    return lambda tmp: rp.measures.make(name, **params)(*args)


def compare(*args: Any, **kwargs: Any) -> Callable[[Path], Any]:
    kwargs.setdefault("progress", False)
    return lambda tmp: rp.compare(*args, **kwargs)


def cli(*argv: str, expect: int = 2) -> Callable[[Path], Any]:
    """Run the CLI with ``{tmp}`` in arguments replaced; the exit status must be ``expect`` (2: usage error)."""

    def run(tmp: Path) -> None:
        _cli_files(tmp)
        status = cli_main([a.format(tmp=tmp) for a in argv])
        assert status == expect

    return run


def _cli_files(tmp: Path) -> None:
    torch.save(torch.rand(20, 1, 8, 8), tmp / "x.pt")
    np.save(tmp / "obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    np.save(tmp / "int.npy", np.ones((20, 1, 8, 8), dtype=np.int64))
    (tmp / "imgs").mkdir(exist_ok=True)
    (tmp / "imgs" / "bad.png").write_bytes(b"\x89PNG not really")
    (tmp / "afile").write_text("x")


def _pickle_with_code(tmp: Path) -> Path:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {tmp / 'pwned'}",))

    path = tmp / "evil.pt"
    torch.save({"0.weight": Evil()}, path)
    return path


def _checkpoint(tmp: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    state = _mlp(5).state_dict()
    edit(state)
    path = tmp / "ck.pt"
    torch.save(state, path)
    return path


def _checkpoints(tmp: Path, bad: Path) -> Any:
    good = tmp / "good.pt"
    torch.save(_mlp(6).state_dict(), good)
    return rp.compare_checkpoints(lambda: _mlp(7), [good, bad], DATA, layers=["0"], progress=False)


def _truncated(tmp: Path, data: bytes, name: str) -> Path:
    path = tmp / name
    path.write_bytes(data[: len(data) // 2])
    return path


def _result_file(tmp: Path) -> bytes:
    rp.compare(A, B, DATA, ["0"], ["0"], progress=False).save(tmp / "m.json")
    return (tmp / "m.json").read_bytes()


def _state_file(tmp: Path, **kwargs: Any) -> Path:
    path = tmp / "run.state.pt"
    rp.compare(A, B, DATA[:2], ["0"], ["0"], progress=False, resume_from=path, **kwargs)
    return path


def _close_to_float64(name: str, cast: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def run(tmp: Path) -> None:
        m = rp.measures.make(name)
        value, exact = float(m(cast(X), cast(Y))), float(m(X, Y))
        assert abs(value - exact) < 5e-3, (value, exact)

    return run


def _fine_requires_grad(tmp: Path) -> None:
    Xg = X.clone().requires_grad_(True)
    value = rp.measures.make("cka")(Xg, Y)
    value.backward()
    assert Xg.grad is not None and torch.isfinite(Xg.grad).all()
    assert abs(float(value) - float(rp.measures.make("cka")(X, Y))) < 1e-12


def _fine_half_model(tmp: Path) -> None:
    half = _mlp(3).to(torch.bfloat16)
    before = _snapshot(half)
    result = rp.compare(half, None, [d.to(torch.bfloat16) for d in DATA], ["0", "4"], progress=False)
    assert torch.isfinite(result.values).all() and abs(float(result.values[0, 0]) - 1.0) < 1e-6
    assert all(torch.equal(v, before["state"][k]) for k, v in half.state_dict(keep_vars=True).items())


def _fine_extreme_scale(tmp: Path) -> None:
    exact = float(rp.measures.make("cka")(X, Y))
    for scale in (1e-150, 1e150):
        assert abs(float(rp.measures.make("cka")(X * scale, Y * scale)) - exact) < 1e-12


def _merge_self(tmp: Path) -> None:
    acc = rp.streaming.LinearCKAMap()
    acc.update({"x": X}, {"y": Y})
    acc.merge(acc)


def _edited_state(tmp: Path) -> None:
    acc = rp.streaming.MinibatchCKAMap()
    acc.update({"x": X, "w": X[:, :3]}, {"y": Y})
    state = acc.state_dict()
    state["tensors"]["cross"] = torch.ones(1, 1, dtype=torch.float64)
    rp.streaming.MinibatchCKAMap().load_state_dict(state)


def _pickled_checkpoint(tmp: Path) -> None:
    try:
        _checkpoints(tmp, _pickle_with_code(tmp))
    finally:
        assert not (tmp / "pwned").exists(), "pickled code ran"


@dataclass(frozen=True)
class Case:
    kind: str
    call: Callable[[Path], Any]
    error: type[Exception] | None = errors.RepsimError
    match: str = ""  # names the problem and the fix (regex)


CASES = [
    # --- measures ---
    Case(
        "nan",
        measure("cka", X.clone().index_fill_(0, torch.tensor([3]), float("nan")), Y),
        errors.NonFiniteInputError,
        r"NaN.*row 3",
    ),
    Case(
        "inf",
        measure("procrustes", X, Y.clone().index_fill_(0, torch.tensor([5]), float("inf"))),
        errors.NonFiniteInputError,
        r"Inf",
    ),
    Case(
        "zero-variance", measure("cka", torch.ones(64, 10), Y), errors.DegenerateInputError, r"(constant|zero variance)"
    ),
    Case("mismatched-n", measure("cka", X, Y[:50]), errors.InputShapeError, r"64 samples.*50.*same samples"),
    Case("too-few-samples", measure("debiased_cka", X[:3], Y[:3]), errors.TooFewSamplesError, r"at least \d+"),
    Case("0-d", measure("cka", torch.tensor(1.0), Y), errors.InputShapeError, r"2-D|\(n, d\)|n_samples"),
    Case("1-d", measure("cka", X[:, 0], Y), errors.InputShapeError, r"2-D|\(n, d\)|n_samples"),
    Case(
        "3-d", measure("cka", X.reshape(64, 5, 2), Y), errors.InputShapeError, r"2-D|\(n, d\)|n_samples|reshape|flatten"
    ),
    Case("integer-dtype", measure("cka", torch.ones(64, 10, dtype=torch.int64), Y), errors.InputDtypeError, r"float"),
    Case("complex-dtype", measure("cka", X.to(torch.complex128), Y), errors.InputDtypeError, r"complex|float"),
    Case(
        "numpy-float128",
        measure("cka", X.numpy().astype(np.longdouble), Y),
        errors.RepsimError,
        r"float128|longdouble|float64",
    ),
    Case("meta-tensor", measure("cka", torch.empty(64, 10, device="meta"), Y), errors.RepsimError, r"meta"),
    Case("unknown-measure", measure("ckaa", X, Y), errors.UnknownNameError, r"Did you mean 'cka'"),
    Case("measure-name-not-str", lambda tmp: rp.measures.make(42), errors.UnknownNameError, r"str|name"),
    Case(
        "half-compute-dtype",
        lambda tmp: rp.measures.make("cka", dtype=torch.float16),
        errors.RepsimError,
        r"float64.*float32",
    ),
    Case("rbf-constant", measure("rbf_cka", torch.ones(64, 10), Y), errors.DegenerateInputError, r"constant|variance"),
    Case("float16-fine", _close_to_float64("cka", lambda t: t.half()), None),
    Case("bfloat16-fine", _close_to_float64("cka", lambda t: t.bfloat16()), None),
    Case("non-contiguous-fine", _close_to_float64("cka", lambda t: t.T.contiguous().T), None),
    Case("requires-grad-fine", _fine_requires_grad, None),
    Case("extreme-scale-fine", _fine_extreme_scale, None),
    # --- capture ---
    Case(
        "unknown-layer-few",
        lambda tmp: rp.capture(A, ["relu"]),
        errors.UnknownNameError,
        r"no module named 'relu'.*known names are: '0', '1', '2', '3', '4'",
    ),
    Case(
        "unknown-layer-many",
        lambda tmp: rp.capture(_many(), ["block.1.lineer"]),
        errors.UnknownNameError,
        r"Did you mean 'block.1.linear'",
    ),
    Case(
        "layer-never-fires",
        compare(LOOP, None, DATA, ["unused"]),
        errors.LayerFiringError,
        r"never ran.*expected_calls",
    ),
    Case(
        "layer-fires-varying",
        compare(LOOP, None, [torch.randn(4, 8), torch.randn(5, 8)], ["lin"]),
        errors.LayerFiringError,
        r"ran 2 times.*first forward says 1",
    ),
    Case(
        "model-raises-mid-forward",
        compare(FLAKY, None, [torch.randn(4, 8), torch.randn(3, 8)], ["0", "1"]),
        errors.ModelForwardError,
        r"Flaky raised RuntimeError.*Check that the data fit",
    ),
    Case(
        "attention-mask-wrong-shape",
        compare(TOKENS, None, [{"x": torch.randn(4, 5, 8), "attention_mask": torch.ones(4, 3)}], ["proj"]),
        errors.RepsimError,
        r"attention mask has shape",
    ),
    Case(
        "attention-mask-nan",
        compare(
            TOKENS, None, [{"x": torch.randn(4, 5, 8), "attention_mask": torch.full((4, 5), float("nan"))}], ["proj"]
        ),
        errors.NonFiniteInputError,
        r"attention mask.*NaN.*0 \(padding\) and 1",
    ),
    Case("wrong-token-policy", compare(TOKENS, None, DATA, ["proj"], tokens="avg"), errors.UnknownNameError, r"mean"),
    Case("wrong-spatial-policy", compare(A, None, DATA, ["0"], spatial="pool"), errors.UnknownNameError, r"flatten"),
    # --- compare ---
    Case("empty-data", compare(A, B, [], ["0"], ["0"]), errors.RepsimError, r"no batches.*iterable"),
    Case(
        "nan-activations",
        compare(A, B, [DATA[0], DATA[1] * float("nan")], ["0"], ["0"]),
        errors.NonFiniteInputError,
        r"NaN|Inf",
    ),
    Case(
        "one-row-batches-minibatch",
        compare(A, B, [torch.randn(1, 8)] * 3, ["0"], ["0"], estimator="minibatch"),
        errors.RepsimError,
        r"at least 4 rows|fewer than",
    ),
    Case(
        "data-b-shorter",
        compare(
            A, B, [(d, torch.arange(16)) for d in DATA], ["0"], ["0"], data_b=[(d, torch.arange(16)) for d in DATA[:2]]
        ),
        errors.RepsimError,
        r"data_b ended after 2",
    ),
    Case(
        "data-x-y-pair",
        compare(A, B, (torch.randn(32, 8), torch.arange(32)), ["0"], ["0"]),
        errors.RepsimError,
        r"\(inputs, labels\) pair.*DataLoader",
    ),
    Case("data-one-tensor", compare(A, B, torch.randn(32, 8), ["0"], ["0"]), errors.RepsimError, r"row by row.*\[X\]"),
    Case(
        "dict-batch-extra-key",
        compare(TOKENS, None, [{"x": torch.randn(4, 5, 8), "token_type": torch.ones(4)}], ["proj"]),
        errors.RepsimError,
        r"'token_type'.*does not take",
    ),
    Case(
        "memory-budget-too-small",
        compare(A, B, DATA, ["0"], ["0"], estimator="sample_space", memory_budget=100),
        errors.MemoryBudgetError,
        r"memory budget.*(Raise memory_budget|estimator)",
    ),
    Case(
        "memory-budget-inf",
        compare(A, B, DATA, ["0"], ["0"], memory_budget=float("inf")),
        errors.RepsimError,
        r"finite number of bytes",
    ),
    Case(
        "memory-budget-zero",
        compare(A, B, DATA, ["0"], ["0"], memory_budget="0.5"),
        errors.RepsimError,
        r"less than one byte",
    ),
    Case("max-batches-bool", compare(A, B, DATA, ["0"], ["0"], max_batches=True), errors.RepsimError, r"max_batches"),
    Case(
        "reference-bool",
        lambda tmp: rp.compare_checkpoints(lambda: _mlp(0), ["a.pt", "b.pt"], DATA, reference=True),
        errors.RepsimError,
        r"reference must be",
    ),
    Case(
        "pickled-checkpoint-with-code",
        _pickled_checkpoint,
        errors.RepsimError,
        r"(?s)weights_only=True.*no pickled code",
    ),
    Case(
        "checkpoint-missing-key",
        lambda tmp: _checkpoints(tmp, _checkpoint(tmp, lambda s: s.pop("4.bias"))),
        errors.RepsimError,
        r"4\.bias",
    ),
    Case(
        "checkpoint-unexpected-key",
        lambda tmp: _checkpoints(tmp, _checkpoint(tmp, lambda s: s.update(extra=torch.zeros(1)))),
        errors.RepsimError,
        r"extra",
    ),
    Case(
        "truncated-checkpoint",
        lambda tmp: _checkpoints(tmp, _truncated(tmp, _ckpt_bytes(), "t.pt")),
        errors.RepsimError,
        r"cannot load checkpoint",
    ),
    Case(
        "truncated-safetensors",
        lambda tmp: _checkpoints(tmp, _truncated(tmp, _safetensors_bytes(), "t.safetensors")),
        errors.RepsimError,
        r"truncated or not a safetensors",
    ),
    Case(
        "truncated-result",
        lambda tmp: rp.SimilarityMap.load(_truncated(tmp, _result_file(tmp), "t.json")),
        errors.RepsimError,
        r"",
    ),
    Case(
        "truncated-state-file",
        lambda tmp: rp.compare(
            A,
            B,
            DATA,
            ["0"],
            ["0"],
            progress=False,
            resume_from=_truncated(tmp, _state_file(tmp).read_bytes(), "t.state.pt"),
        ),
        errors.RepsimError,
        r"resume state file",
    ),
    Case(
        "state-file-from-other-run",
        lambda tmp: rp.compare(A, B, DATA, ["0"], ["4"], progress=False, resume_from=_state_file(tmp)),
        errors.ResumeStateError,
        r"other settings.*layers.*Delete it",
    ),
    # --- accumulators ---
    Case("merge-self", _merge_self, errors.RepsimError, r"itself.*counted twice"),
    Case("hand-edited-state-dict", _edited_state, errors.RepsimError, r"malformed.*state_dict\(\)"),
    # --- stats ---
    Case(
        "stats-seed-str",
        lambda tmp: rp.stats.permutation_test("cka", X, Y, n_permutations=10, seed="abc"),
        errors.RepsimError,
        r"seed",
    ),
    Case(
        "stats-zero-permutations",
        lambda tmp: rp.stats.permutation_test("cka", X, Y, n_permutations=0),
        errors.RepsimError,
        r"n_permutations",
    ),
    Case(
        "stats-alpha-out-of-range",
        lambda tmp: rp.stats.bootstrap_ci("cka", X, Y, n_boot=10, alpha=1.5),
        errors.RepsimError,
        r"alpha",
    ),
    Case(
        "stats-mismatched-n",
        lambda tmp: rp.stats.bootstrap_ci("cka", X, Y[:10], n_boot=10),
        errors.InputShapeError,
        r"same samples",
    ),
    # --- shift / audit ---
    Case(
        "shift-unknown-layer",
        lambda tmp: rp.adversarial.shift(A, "nope", DATA, steps=1, progress=False),
        errors.UnknownNameError,
        r"nope",
    ),
    Case(
        "shift-target-not-a-number",
        lambda tmp: rp.adversarial.shift(A, "0", DATA, target="x", steps=1, progress=False),
        errors.RepsimError,
        r"target must be finite",
    ),
    Case(
        "shift-negative-steps",
        lambda tmp: rp.adversarial.shift(A, "0", DATA, steps=-1, progress=False),
        errors.RepsimError,
        r"steps must be (None or )?a non-negative integer",
    ),
    Case(
        "shift-unknown-measure",
        lambda tmp: rp.adversarial.shift(A, "0", DATA, measure="nope", steps=1, progress=False),
        errors.UnknownNameError,
        r"rp.measures.list\(\)",
    ),
    # --- the command line (exit status 2: "repsim ...: error: ...", never a traceback) ---
    Case(
        "cli-batch-size-zero",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--data",
            "{tmp}/x.pt",
            "--batch-size",
            "0",
            "--no-progress",
        ),
        SystemExit,
    ),
    Case(
        "cli-memory-budget-garbage",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--data",
            "{tmp}/x.pt",
            "--memory-budget",
            "1.2.3GiB",
            "--out",
            "{tmp}/o",
            "--no-progress",
        ),
        None,
    ),
    Case(
        "cli-object-npy",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--data",
            "{tmp}/obj.npy",
            "--out",
            "{tmp}/o",
            "--no-progress",
        ),
        None,
    ),
    Case(
        "cli-int64-images",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--data",
            "{tmp}/int.npy",
            "--out",
            "{tmp}/o",
            "--no-progress",
        ),
        None,
    ),
    Case(
        "cli-corrupt-image",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--data",
            "{tmp}/imgs",
            "--out",
            "{tmp}/o",
            "--no-progress",
        ),
        None,
    ),
    Case(
        "cli-factory-unknown-keyword",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn,width=3",
            "--data",
            "{tmp}/x.pt",
            "--out",
            "{tmp}/o",
            "--no-progress",
        ),
        None,
    ),
    Case(
        "cli-unwritable-out",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--data",
            "{tmp}/x.pt",
            "--out",
            "{tmp}/afile/sub/map",
            "--no-progress",
        ),
        None,
    ),
    Case(
        "cli-unknown-layer",
        cli(
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--data",
            "{tmp}/x.pt",
            "--layers-a",
            "nope",
            "--out",
            "{tmp}/o",
            "--no-progress",
        ),
        None,
    ),
    Case(
        "cli-audit-unknown-layer",
        cli(
            "audit",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--layer-a",
            "nope",
            "--data",
            "{tmp}/x.pt",
            "--out",
            "{tmp}/audit",
            "--steps",
            "0",
            "--no-progress",
        ),
        None,
    ),
    # --- captum (repsim_plugin/captum.py, issue 14) -------------------------------------------------------------------
    Case(
        "audit-unknown-layer",
        lambda tmp: rp.adversarial.audit(A, "nope", B, "0", [DATA[0]], steps=0, progress=False),
        errors.UnknownNameError,
        r"no module named 'nope'. The known names are: '0', '1'",
    ),
    Case(
        "captum-layer-of-another-model",
        lambda tmp: rp_captum.LayerSimilarity(A, B[0]).compare(DATA[0]),
        errors.RepsimError,
        r"not submodules of the forward_func model; pass modules of that model",
    ),
    Case(
        "captum-layer-name-not-module",
        lambda tmp: rp_captum.LayerSimilarity(A, "0").compare(DATA[0]),
        errors.RepsimError,
        r"module or a non-empty list of modules",
    ),
    Case(
        "captum-other-inputs-mismatched-n",
        lambda tmp: (
            __import__("repsim_plugin.captum")
            .captum.LayerSimilarity(A, A[0])
            .compare(DATA[0], rp_captum.LayerSimilarity(B, B[0]), other_inputs=DATA[1][:10])
        ),
        errors.InputShapeError,
        r"16 samples.*10.*same samples",
    ),
    Case(
        "captum-shift-target-out-of-range",
        lambda tmp: rp_captum.RepresentationShift(A, A[2], target=1.5),
        errors.RepsimError,
        r"outside .*range \[0, 1\].*give a value in that range",
    ),
    Case(
        "captum-shift-negative-epsilon",
        lambda tmp: rp_captum.RepresentationShift(A, A[2], target=0.3, epsilon=-1.0),
        errors.RepsimError,
        r"epsilon must be a positive number",
    ),
    Case(
        "captum-attributions-of-nan-inputs",
        lambda tmp: rp_captum.attribution_change(A, B, DATA[0] * float("nan"), attribution=Saliency),
        errors.NonFiniteInputError,
        r"NaN or Inf.*Drop those samples",
    ),
    Case(
        "captum-attribution-not-a-class",
        lambda tmp: rp_captum.attribution_change(A, B, DATA[0], attribution=3),
        errors.RepsimError,
        r"captum attribution class such as captum.attr.IntegratedGradients",
    ),
]

#: Rows whose kind is tried through the command line: the ``cli()`` call asserts the exit status itself.
CLI_KINDS = {c.kind for c in CASES if c.kind.startswith("cli-")}


def _many() -> nn.Module:
    return OrderedDictModule(block=nn.ModuleList([nn.ModuleDict({"linear": nn.Linear(4, 4)}) for _ in range(12)]))


class OrderedDictModule(nn.Module):
    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _ckpt_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(_mlp(5).state_dict(), buffer)
    return buffer.getvalue()


def _safetensors_bytes() -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in _mlp(5).state_dict().items()})


def test_the_table_covers_at_least_40_kinds() -> None:
    kinds = [c.kind for c in CASES]
    assert len(set(kinds)) == len(kinds) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.kind for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    before = {name: _snapshot(model) for name, model in MODELS.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # estimator and small-sample warnings are beside the point here
        if case.error is None:
            case.call(tmp_path)
        elif case.error is SystemExit:  # argparse's own usage error
            with pytest.raises(SystemExit) as info:
                case.call(tmp_path)
            assert info.value.code == 2
        else:
            with pytest.raises(case.error, match=case.match) as info:
                case.call(tmp_path)
            assert isinstance(info.value, ValueError)
            assert len(str(info.value)) > 30  # a message that says something
    _untouched(before)


# --- the defect classes, each with tests of its own -------------------------------------------------------------------


def test_cli_checkpoint_maps_never_overwrite_each_other(tmp_path: Path) -> None:
    from repsim_plugin.digits import build_digits_cnn

    torch.save(torch.rand(24, 1, 8, 8), tmp_path / "x.pt")
    paths = []
    for folder, name in (("r1", "model.epoch1.pt"), ("r2", "model.epoch1.pt"), ("r2", "model.epoch2.pt")):
        (tmp_path / folder).mkdir(exist_ok=True)
        torch.manual_seed(len(paths))
        torch.save(build_digits_cnn().state_dict(), tmp_path / folder / name)
        paths.append(str(tmp_path / folder / name))
    out = tmp_path / "out"
    argv = [
        "compare",
        "--model",
        "module:repsim_plugin.digits:build_digits_cnn",
        "--data",
        str(tmp_path / "x.pt"),
        "--layers-a",
        "relu1",
        "relu3",
        "--checkpoints",
        *paths,
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    written = sorted(p.name for p in out.iterdir() if p.suffix == ".json")
    assert len(written) == 3, written  # 3 pairs, 3 files: none lost to a dot or a repeated file name
    pairs = {
        (rp.SimilarityMap.load(out / w).extra["checkpoint_a"], rp.SimilarityMap.load(out / w).extra["checkpoint_b"])
        for w in written
    }
    assert len(pairs) == 3


@pytest.mark.parametrize(("out", "expect"), [("name_v0.5", "name_v0.5.json"), ("folder/", "folder/repsim-map.json")])
def test_cli_out_keeps_dots_and_a_trailing_slash_is_a_folder(tmp_path: Path, out: str, expect: str) -> None:
    torch.save(torch.rand(20, 1, 8, 8), tmp_path / "x.pt")
    argv = [
        "compare",
        "--model-a",
        "module:repsim_plugin.digits:build_digits_cnn",
        "--data",
        str(tmp_path / "x.pt"),
        "--layers-a",
        "relu1",
        "--out",
        f"{tmp_path}/{out}",
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    assert (tmp_path / expect).is_file() and (tmp_path / expect).with_suffix(".png").is_file()


def test_cli_best_match_is_the_argmin_for_distances(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(torch.rand(40, 1, 8, 8), tmp_path / "x.pt")
    argv = [
        "compare",
        "--model-a",
        "module:repsim_plugin.digits:build_digits_mlp",
        "--data",
        str(tmp_path / "x.pt"),
        "--layers-a",
        "fc1",
        "relu1",
        "fc2",
        "--measure",
        "procrustes-distance=angular",
        "--out",
        str(tmp_path / "m"),
        "--no-progress",
        "--seed",
        "1",
    ]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    table = out[next(i for i, line in enumerate(out) if "best match in B" in line) + 1 :]
    rows = [line.split() for line in table if line.startswith("  ") and line.split()[0] in ("fc1", "relu1", "fc2")]
    assert [(row[0], row[1]) for row in rows] == [("fc1", "fc1"), ("relu1", "relu1"), ("fc2", "fc2")]


def test_cli_seed_seeds_the_models_it_builds(tmp_path: Path) -> None:
    torch.save(torch.rand(16, 1, 8, 8), tmp_path / "x.pt")
    spec = "module:repsim_plugin.digits:build_digits_cnn"  # randomly initialised: no checkpoint
    base = [
        "compare",
        "--model-a",
        spec,
        "--model-b",
        spec,
        "--data",
        str(tmp_path / "x.pt"),
        "--layers-a",
        "relu1",
        "--layers-b",
        "relu1",
        "--no-progress",
    ]
    for name in ("one", "two"):
        assert cli_main([*base, "--seed", "3", "--out", str(tmp_path / name)]) == 0
    assert cli_main([*base, "--seed", "4", "--out", str(tmp_path / "other")]) == 0
    one, two, other = (rp.SimilarityMap.load(tmp_path / f"{k}.json") for k in ("one", "two", "other"))
    assert one.fingerprints == two.fingerprints and torch.equal(one.values, two.values)
    assert one.fingerprints["a"] != one.fingerprints["b"]  # model B gets its own seed
    assert other.fingerprints != one.fingerprints


def test_sample_space_budget_is_enforced_as_rows_arrive() -> None:
    m = nn.Sequential(nn.Linear(8, 600), nn.Tanh())
    data = [torch.randn(4, 8)] + [torch.randn(300, 8) for _ in range(10)]  # a small first batch hides n
    with pytest.raises(errors.MemoryBudgetError, match=r"sample_space.*'feature_streaming', 'minibatch'"):
        rp.compare(m, None, data, ["1"], memory_budget="3MiB", estimator="sample_space", progress=False)


def test_rejected_sample_space_update_keeps_nothing() -> None:
    acc = rp.streaming.SampleSpaceCKAMap()
    acc.update({"x": X[:40]}, {"y": Y[:40]})
    with pytest.raises(errors.RepsimError):
        acc.update({"x": X[40:]}, {"y": Y[40:, :2]})  # side b has the wrong features
    acc.update({"x": X[40:]}, {"y": Y[40:]})
    one_shot = rp.streaming.SampleSpaceCKAMap()
    one_shot.update({"x": X}, {"y": Y})
    torch.testing.assert_close(acc.compute(), one_shot.compute(), rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", ["LinearCKA", "LinearCKAMap", "MinibatchCKAMap", "SampleSpaceCKAMap", "MinibatchCKA"])
def test_merge_with_itself_is_refused_for_every_accumulator(cls: str) -> None:
    acc = getattr(rp.streaming, cls)()
    if cls in ("LinearCKA", "MinibatchCKA"):
        acc.update(X, Y)
    else:
        acc.update({"x": X}, {"y": Y})
    with pytest.raises(errors.RepsimError, match="itself"):
        acc.merge(acc)


@pytest.mark.parametrize("cls", ["LinearCKAMap", "MinibatchCKAMap", "SampleSpaceCKAMap"])
@pytest.mark.parametrize("edit", ["nan", "shape", "negative-n", "drop-key", "string-rows"])
def test_hand_edited_map_state_is_refused(cls: str, edit: str) -> None:
    acc = getattr(rp.streaming, cls)()
    acc.update({"x": X, "w": X[:, :3]}, {"y": Y})
    state = acc.state_dict()
    tensors_key = "rows_a" if cls == "SampleSpaceCKAMap" else "tensors"
    tensors = state[tensors_key]
    first = next(iter(tensors))
    if edit == "nan":
        tensors[first] = torch.full_like(tensors[first], float("nan"))
    elif edit == "shape":
        tensors[first] = tensors[first][:1]
    elif edit == "negative-n":
        state["n"] = -5
    elif edit == "drop-key":
        del tensors[first]
    else:
        tensors[first] = "rows"
    fresh = getattr(rp.streaming, cls)()
    with pytest.raises(errors.RepsimError, match="state"):
        fresh.load_state_dict(state)
    assert not fresh.layers_a  # nothing was loaded


def test_small_sample_warning_covers_procrustes_and_kernel_cka() -> None:
    Xs, Ys = torch.randn(8, 60), torch.randn(8, 40)
    for name in ("procrustes", "procrustes-distance=euclidean", "rbf_cka", "shape_metric-alpha=0.5-distance=angular"):
        with pytest.warns(errors.SmallSampleBiasWarning, match="n=8"):
            rp.measures.make(name)(Xs, Ys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("procrustes", "rbf_cka", "debiased_cka"):
            rp.measures.make(name)(torch.randn(100, 10), torch.randn(100, 10))


SCALE_FREE = [n for n in rp.measures.list() if "isotropic_scaling" in rp.measures.make(n).invariances]


@pytest.mark.parametrize("name", SCALE_FREE)
def test_every_scale_free_measure_ignores_extreme_scales(name: str) -> None:
    m = rp.measures.make(name)  # the others are fuzzed: a value, or a clear overflow error
    exact = float(m(X, Y))
    for sx, sy in ((1e-300, 1e-300), (1e300, 1e300), (1e200, 1.0), (1.0, 1e-200)):
        assert float(m(X * sx, Y * sy)) == pytest.approx(exact, abs=1e-9)


def test_streaming_overflow_is_a_clear_error_never_nan() -> None:
    acc = rp.streaming.LinearCKA()
    acc.update(X * 1e160, Y)
    try:
        value = float(acc.compute())
    except errors.DegenerateInputError as err:
        assert "overflow" in str(err) and "Rescale" in str(err)
    else:
        assert value == pytest.approx(float(rp.measures.make("cka")(X, Y)), abs=1e-9)


def test_map_json_hand_edited_is_a_clear_error(tmp_path: Path) -> None:
    data = json.loads(_result_file(tmp_path))
    edits = (
        ("extra", [1]),
        ("fingerprints", 3),
        ("values", "x"),
        ("reduction", "abc"),
        ("interval_level", "abc"),
        ("schema_version", True),
        ("layers_a", 3),
    )
    for key, value in edits:
        edited = dict(data, **{key: value})
        (tmp_path / "e.json").write_text(json.dumps(edited))
        with pytest.raises(errors.RepsimError):
            rp.SimilarityMap.load(tmp_path / "e.json")


# --- interrupts (Ctrl-C) at any point of compare and shift ------------------------------------------------------------


class Interrupting(nn.Module):
    """A linear layer that raises KeyboardInterrupt at the ``at``-th forward of any copy (a shared counter)."""

    calls: ClassVar[dict[str, int]] = {"n": 0, "at": -1}

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Interrupting.calls["n"] += 1
        if Interrupting.calls["n"] == Interrupting.calls["at"]:
            raise KeyboardInterrupt
        return self.lin(x)


def _interruptible() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), Interrupting(), nn.ReLU(), nn.Linear(16, 4)).train()
    m[1].eval()
    return m


@pytest.mark.parametrize("at", [1, 3])
@pytest.mark.parametrize("grad", [True, False])
def test_an_interrupt_anywhere_in_compare_or_shift_leaves_the_model_as_it_was(at: int, grad: bool) -> None:
    model = _interruptible()
    before = _snapshot(model)
    for run in (
        lambda: rp.compare(model, None, DATA, ["0", "2", "4"], progress=False),
        lambda: rp.compare(model, _mlp(1), DATA, ["2"], ["0"], estimator="sample_space", progress=False),
        lambda: rp.adversarial.shift(model, "2", DATA, target=0.3, steps=3, batch_size=16),
    ):
        Interrupting.calls.update(n=0, at=at)
        with torch.set_grad_enabled(grad):
            with pytest.raises(KeyboardInterrupt):
                run()
            assert torch.is_grad_enabled() is grad
        assert _hooks(model) == 0
        now = _snapshot(model)
        assert now["flags"] == before["flags"] and now["grad"] == before["grad"]
        assert all(torch.equal(now["state"][k], v) for k, v in before["state"].items())
    Interrupting.calls.update(n=0, at=-1)


# --- REDTEAM 12 and 17: the analytic transforms at extreme scales, values that can never be right ---------------


def test_transforms_keep_their_direction_and_closed_forms_at_extreme_scales() -> None:
    from repsim_plugin.adversarial import transforms as tf

    H = torch.randn(50, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    v = torch.randn(6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[:10] = True
    moved = tf.translate_subset(H, mask, v, 5.0)
    assert torch.allclose(tf.translate_subset(H, mask, v * 1e300, 5.0), moved, rtol=0, atol=1e-12)
    assert torch.allclose(tf.translate_subset(H, mask, v * 1e-300, 5.0), moved, rtol=0, atol=1e-12)
    for scale in (1e-160, 1e160):
        assert float(tf.participation_ratio(H * scale)) == pytest.approx(float(tf.participation_ratio(H)), rel=1e-12)
        assert float(tf.subset_translation_limit(H * scale, mask)) == pytest.approx(
            float(tf.subset_translation_limit(H, mask)), rel=1e-12
        )
        assert float(tf.outlier_limit(H * scale, 3)) == pytest.approx(float(tf.outlier_limit(H, 3)), rel=1e-12)


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: rp.adversarial.transforms.scale_for_target_cka(X, torch.arange(64) < 9, torch.ones(10), 1.5),
         r"outside .*range \[0, 1\]"),
        (lambda: rp.adversarial.audit(A, "0", B, "0", [DATA[0]], steps=0, progress=False, tolerance=-1),
         r"tolerance must be a non-negative number <= 1"),
        (lambda: rp.SimilarityMap(torch.ones(2, 2, dtype=torch.bool), ["a", "b"], ["c", "d"], "cka"),
         r"boolean matrix; a similarity map holds numbers"),
        (lambda: rp.stats.permutation_test("cka", X, Y, n_permutations=10, seed=2**70),
         r"seed must be an integer in \["),
        (lambda: rp.SimilarityMap(torch.ones(2, 2), ["a", "b"], ["c", "d"], "cka", interval_level="0.95"),
         r"interval_level must be a number in \(0, 1\)"),
        (lambda: rp.stats.null_baseline("cka", 30, 4, 4, n_samples=5).quantile(1.5), r"q must be a number in \[0, 1\]"),
        (lambda: rp.adversarial.transforms.scale_for_target_cka(X, torch.arange(64) < 9, torch.ones(10), 0.2, grid=0),
         r"grid must be an integer >= 2"),
        (lambda: rp.adversarial.transforms.scale_for_target_cka(X, torch.arange(64) < 9, torch.ones(10), 0.2,
                                                               max_scale=-1), r"max_scale must be a finite number"),
        (lambda: rp.measures.make("rbf_cka", sigma=1e300)(X, Y), r"sigma=1e\+300 is outside \(0, 1e150\]"),
    ],
    ids=[
        "target-above-cka-range", "negative-tolerance", "boolean-map-values", "seed-beyond-torch",
        "interval-level-string", "null-quantile-above-1", "stress-grid-0", "stress-negative-max-scale",
        "rbf-sigma-overflow",
    ],
)  # fmt: skip
def test_values_that_can_never_be_right_are_refused(call: Callable[[], Any], pattern: str) -> None:
    with pytest.raises(errors.RepsimError, match=pattern):
        call()


def test_a_null_baseline_of_one_draw_is_refused_rather_than_a_nan_spread() -> None:
    with pytest.raises(errors.RepsimError, match=r"n_samples must be .*>= 2"):
        rp.stats.null_baseline("cka", 30, 4, 4, n_samples=1)
    assert np.isfinite(rp.stats.null_baseline("cka", 30, 4, 4, n_samples=2).std)
