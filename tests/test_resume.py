"""Resume after a crash: ``compare(resume_from=..., save_every=...)``, ``compare_checkpoints`` and the CLI.

The crash is real: a subprocess runs the comparison and is killed with SIGKILL in the middle of the data (it kills
itself from inside the data iterable, after the state of some batches was saved, so the point is deterministic).
The run that resumes must give the map of an uninterrupted run (to 1e-12) without running the counted batches
through the models, and a state file from other data, models, layers or settings must be refused, naming the file
and what differs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import repsim_plugin as rp
from repsim_plugin.errors import RepsimError, ResumeStateError

LAYERS = ["0", "2"]


def _model(seed: int, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 6), nn.Tanh())


def _data(n_batches: int = 9, rows: int = 24, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=g) for _ in range(n_batches)]


class Counting(nn.Sequential):
    """A real small model that counts its forward passes."""

    def __init__(self, *mods: nn.Module) -> None:
        super().__init__(*mods)
        self.forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return super().forward(x)


CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from torch import nn
    import repsim_plugin as rp
    sys.path.insert(0, {tests!r})
    from test_resume import _model, _data
    state, kill_at = sys.argv[1], int(sys.argv[2])
    def batches():
        for i, b in enumerate(_data()):
            if i == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield b
    rp.compare(_model(0), _model(1, 12), batches(), {layers!r}, {layers!r}, measure={measure!r},
               estimator={estimator!r}, progress=False, resume_from=state, save_every=2)
    """
)


def _run_killed(state: Path, kill_at: int, measure: str = "cka", estimator: str = "auto") -> None:
    code = CHILD.format(tests=str(Path(__file__).parent), layers=LAYERS, measure=measure, estimator=estimator)
    proc = subprocess.run([sys.executable, "-c", code, str(state), str(kill_at)], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]


ESTIMATORS = [("cka", "auto"), ("debiased_cka", "sample_space"), ("rbf_cka", "minibatch")]


@pytest.mark.parametrize(("measure", "estimator"), ESTIMATORS[1:2])
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path: Path, measure: str, estimator: str) -> None:
    state = tmp_path / "run.state.pt"
    _run_killed(state, kill_at=5, measure=measure, estimator=estimator)  # batches 0-4 ran; saved after 2 and 4
    assert state.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no temporary file left
    full = rp.compare(_model(0), _model(1, 12), _data(), LAYERS, LAYERS, measure=measure, estimator=estimator,
                      progress=False)  # fmt: skip
    a, b = Counting(*_model(0)), Counting(*_model(1, 12))
    resumed = rp.compare(a, b, _data(), LAYERS, LAYERS, measure=measure, estimator=estimator, progress=False,
                         resume_from=state, save_every=2)  # fmt: skip
    assert resumed.extra["resumed_batches"] == 4
    assert (a.forwards, b.forwards) == (9 - 4, 9 - 4)  # the counted batches were not run again
    torch.testing.assert_close(resumed.values, full.values, rtol=0, atol=1e-12)
    assert resumed.n == full.n and resumed.estimator == full.estimator
    assert resumed.extra["data_fingerprint"] == full.extra["data_fingerprint"]
    # the finished run saved its final state: the same call again runs no forward at all
    c, d = Counting(*_model(0)), Counting(*_model(1, 12))
    again = rp.compare(c, d, _data(), LAYERS, LAYERS, measure=measure, estimator=estimator, progress=False,
                       resume_from=state)  # fmt: skip
    assert again.extra["resumed_batches"] == 9 and c.forwards == 0
    torch.testing.assert_close(again.values, full.values, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("measure", "estimator"), [ESTIMATORS[0], ESTIMATORS[2]])
def test_resume_of_every_estimator_equals_uninterrupted(tmp_path: Path, measure: str, estimator: str) -> None:
    """The same as above without the (slow to start) subprocess: the run that stopped is an earlier call."""
    state, kw = tmp_path / "s.pt", {"measure": measure, "estimator": estimator, "progress": False}
    rp.compare(_model(0), _model(1, 12), _data()[:5], LAYERS, LAYERS, resume_from=state, save_every=2, **kw)
    full = rp.compare(_model(0), _model(1, 12), _data(), LAYERS, LAYERS, **kw)
    a, b = Counting(*_model(0)), Counting(*_model(1, 12))
    resumed = rp.compare(a, b, _data(), LAYERS, LAYERS, resume_from=state, **kw)
    assert resumed.extra["resumed_batches"] == 5 and a.forwards == 4
    torch.testing.assert_close(resumed.values, full.values, rtol=0, atol=1e-12)
    assert resumed.estimator == full.estimator and resumed.n == full.n


def test_fresh_run_saves_every_k_and_records_zero_resumed(tmp_path: Path) -> None:
    state = tmp_path / "s.pt"
    result = rp.compare(_model(0), _model(1), _data(5), LAYERS, LAYERS, progress=False, resume_from=state,
                        save_every=3)  # fmt: skip
    assert result.extra["resumed_batches"] == 0 and state.is_file()
    raw = torch.load(state, weights_only=True)  # plain tensors and a JSON string: no pickled objects
    assert raw["format"] == "repsim-resume-state" and isinstance(raw["meta"], str)
    assert oct(state.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_default_schedule_saves_after_the_first_batch_and_at_the_end(tmp_path: Path) -> None:
    from repsim_plugin.compare import resume

    state = tmp_path / "s.pt"
    saves = []
    original = resume.Resume.save

    def counting(self: resume.Resume, engine: object) -> None:
        saves.append(len(self.digests))
        original(self, engine)

    resume.Resume.save = counting  # type: ignore[method-assign]
    try:
        rp.compare(_model(0), _model(1), _data(6), LAYERS, LAYERS, progress=False, resume_from=state)
    finally:
        resume.Resume.save = original  # type: ignore[method-assign]
    assert saves[0] == 1 and saves[-1] == 6 and len(saves) < 6  # the saves of tiny states are spaced by >= 1 s


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    state = tmp_path / "s.pt"
    rp.compare(_model(0), _model(1), _data(4), LAYERS, LAYERS, progress=False, resume_from=state, save_every=2)
    return state


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"data": _data(6, seed=7)}, "other data: batch 0"),
        ({"data": _data(6)[:1] + _data(6, seed=5)[1:]}, "other data: batch 1"),
        ({"data": _data(3)}, "the data yielded only 3"),
        ({"model_b": _model(2)}, "other model weights"),
        ({"layers_a": ["0"]}, "layers: saved ['0', '2'], now ['0']"),
        ({"measure": "debiased_cka"}, "measure: saved"),
        ({"estimator": "sample_space"}, "estimator: saved 'auto', now 'sample_space'"),
        ({"tokens": "cls"}, "tokens: saved 'mean', now 'cls'"),
        ({"memory_budget": "1GiB"}, "memory_budget"),
        ({"max_batches": 2}, "more than max_batches=2"),
    ],
)
def test_state_from_another_run_is_refused(saved: Path, change: dict, says: str) -> None:
    args = {"model_a": _model(0), "model_b": _model(1), "data": _data(6), "layers_a": LAYERS, "layers_b": LAYERS}
    args |= change
    with pytest.raises(ResumeStateError, match="resume state file") as info:
        rp.compare(**args, progress=False, resume_from=saved)
    assert str(saved) in str(info.value) and says in str(info.value)


def test_damaged_truncated_foreign_or_pickled_state_files_are_refused(saved: Path, tmp_path: Path) -> None:
    kwargs = {"progress": False}
    run = lambda path: rp.compare(_model(0), _model(1), _data(4), LAYERS, LAYERS, resume_from=path, **kwargs)  # noqa: E731
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(saved.read_bytes()[:200])
    with pytest.raises(RepsimError, match=r"truncated\.pt"):
        run(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"a": torch.zeros(2)}, foreign)
    with pytest.raises(ResumeStateError, match="not a repsim resume state"):
        run(foreign)
    # a pickle that would run code: refused by torch.load(weights_only=True), nothing runs
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "repsim-resume-state", "x": Evil()}, evil)
    with pytest.raises(RepsimError, match="weights_only"):
        run(evil)
    assert not marker.exists()
    # hand-edited: a NaN in the saved statistics, or a tensor of another shape
    raw = torch.load(saved, weights_only=True)
    key = next(iter(raw["tensors"]))
    for bad in (torch.full_like(raw["tensors"][key], float("nan")), torch.zeros(3, 3, 3, dtype=torch.float64)):
        edited = dict(raw, tensors={**raw["tensors"], key: bad})
        path = tmp_path / "edited.pt"
        torch.save(edited, path)
        with pytest.raises(ResumeStateError, match="damaged or was edited"):
            run(path)
    raw["meta"] = raw["meta"][:-5]
    torch.save(raw, tmp_path / "edited_json.pt")
    with pytest.raises(ResumeStateError, match="damaged or was edited"):
        run(tmp_path / "edited_json.pt")


def test_resume_argument_checks(tmp_path: Path) -> None:
    run = lambda **kw: rp.compare(_model(0), _model(1), _data(2), LAYERS, LAYERS, progress=False, **kw)  # noqa: E731
    with pytest.raises(RepsimError, match="save_every= needs resume_from="):
        run(save_every=2)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(RepsimError, match="save_every must be a positive int"):
            run(resume_from=tmp_path / "s.pt", save_every=bad)
    with pytest.raises(RepsimError, match="is a folder"):
        run(resume_from=tmp_path)
    with pytest.raises(RepsimError, match="must be a path"):
        run(resume_from=3)


def _checkpoints(tmp_path: Path) -> list[Path]:
    paths = []
    for k in range(3):
        path = tmp_path / f"ck{k}.pt"
        torch.save(_model(10 + k).state_dict(), path)
        paths.append(path)
    return paths


def test_compare_checkpoints_resumes_and_names_a_changed_checkpoint(tmp_path: Path) -> None:
    paths = _checkpoints(tmp_path)
    state = tmp_path / "ck.state.pt"
    full = rp.compare_checkpoints(lambda: _model(0), paths, _data(), layers=LAYERS, progress=False)
    rp.compare_checkpoints(lambda: _model(0), paths, _data()[:5], layers=LAYERS, progress=False, resume_from=state,
                           save_every=2)  # fmt: skip
    resumed = rp.compare_checkpoints(lambda: _model(0), paths, _data(), layers=LAYERS, progress=False,
                                     resume_from=state)  # fmt: skip
    assert resumed.keys() == full.keys()
    for key, value in full.items():
        assert resumed[key].extra["resumed_batches"] == 5
        torch.testing.assert_close(resumed[key].values, value.values, rtol=0, atol=1e-12)
    torch.save(_model(99).state_dict(), paths[1])  # one checkpoint changed since the state was saved
    with pytest.raises(ResumeStateError, match=r"other model weights: 'ck1.pt'"):
        rp.compare_checkpoints(lambda: _model(0), paths, _data(), layers=LAYERS, progress=False, resume_from=state)


def test_cli_resume_from(tmp_path: Path) -> None:
    from repsim_plugin.cli import main

    spec = "module:repsim_plugin.digits:build_digits_mlp"
    x = torch.rand(90, 64)
    torch.save(x, tmp_path / "x.pt")
    common = ["compare", "--model-a", spec, "--data", str(tmp_path / "x.pt"), "--batch-size", "16", "--no-progress",
              "--seed", "3"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    state = tmp_path / "cli.state.pt"
    assert main([*common, "--max-batches", "3", "--out", str(tmp_path / "part"), "--resume-from", str(state),
                 "--save-every", "1"]) == 0  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "resumed"), "--resume-from", str(state)]) == 0
    full = rp.SimilarityMap.load(tmp_path / "full.json")
    resumed = rp.SimilarityMap.load(tmp_path / "resumed.json")
    assert resumed.extra["resumed_batches"] == 3
    torch.testing.assert_close(resumed.values, full.values, rtol=0, atol=1e-12)
    assert main([*common, "--layers-a", "fc1", "--out", str(tmp_path / "o"), "--resume-from", str(state)]) == 2
