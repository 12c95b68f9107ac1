"""Resume a comparison after a crash: the accumulators' state saved every k batches, verified when read back.

``rp.compare(..., resume_from=path, save_every=k)`` saves, atomically, every ``k`` counted batches and once at the
end (``save_every=None``, the default, saves as often as keeps the time spent saving under about 5% of the run:
after the first batch, then whenever 20 times the last save's duration, and at least a second, have passed) what the
engine has accumulated: every pair's accumulator state dict, the per-side row counts, and the fingerprints of what
produced them (each counted batch, each model's weights, the layers, the measure, the estimator and its planning
inputs, the reduction policies). Re-running the same call with the same path reads the file, checks that the
settings and models are the ones saved, hashes the first batches of the data and checks that they are the counted
ones (without running them through the models), restores the accumulators, and goes on with the next batch. The map
is the one an uninterrupted run gives (the state is float64 and restored bit for bit).

The file is a ``torch.save`` of plain tensors and one JSON string, read back with ``torch.load(weights_only=True)``:
no pickled code is written or run. A file from other data, other models, other layers or other settings is refused
with a :class:`~repsim_plugin.errors.ResumeStateError` naming the file and what differs.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._utils import dist
from .._utils.batches import digest
from .._utils.io import atomic_write, load_torch
from ..errors import RepsimError, ResumeStateError
from .plan import choose_estimator

__all__ = ["FORMAT", "Resume", "ResumeStateError", "open_resume"]

FORMAT = "repsim-resume-state"
#: ``save_every=None``: wait this many times the last save's duration (saving stays under ~5% of the run) ...
ADAPTIVE_FACTOR = 20.0
#: ... and at least this many seconds between saves
ADAPTIVE_MIN_SECONDS = 1.0
VERSION = 1


# --- tensors + JSON, no pickle ---------------------------------------------------------------------------------------


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data, each tensor replaced by ``{"__tensor__": key}`` and stored in ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise RepsimError(f"cannot save a state with non-string keys {list(obj)[:3]} in a resume file.")
        return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
    if isinstance(obj, list | tuple):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    return {"__repr__": repr(obj)}


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            t = tensors.get(obj["__tensor__"])
            if not isinstance(t, torch.Tensor):
                raise KeyError(f"tensor {obj['__tensor__']!r} is missing")
            return t
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
        if "__repr__" in obj:
            return str(obj["__repr__"])
        raise KeyError(f"unknown entry {sorted(obj)[:3]}")
    return obj


def batch_digest(group: Sequence[Any]) -> str:
    """sha256 (32 hex digits) of one batch of every data stream: values, shapes, dtypes, labels included."""
    h = hashlib.sha256()
    digest(h, list(group))
    return h.hexdigest()[:32]


# --- the run's identity ----------------------------------------------------------------------------------------------


def _settings(
    engine_sides: Sequence[Any],
    pairs: Sequence[Any],
    measure: Any,
    *,
    estimator: str,
    memory_budget: int,
    n_streams: int,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """What must be the same for a saved state to continue this run (models are compared separately)."""
    return {
        "measure": measure.id,
        "estimator": estimator,
        "memory_budget": int(memory_budget),
        "streams": n_streams,
        "pairs": [[p.i, p.j, p.sub_i and list(p.sub_i), p.sub_j and list(p.sub_j)] for p in pairs],
        "sides": [
            {
                "layers": list(s.recorder.modules),
                "stream": s.stream,
                "tokens": s.recorder.tokens,
                "spatial": s.recorder.spatial,
                "output": repr(s.recorder.output),
            }
            for s in engine_sides
        ],
        **{k: v for k, v in extra.items()},
    }


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        if key == "sides" and isinstance(saved.get(key), list) and len(saved[key]) == len(now.get(key, [])):
            for k, (a, b) in enumerate(zip(saved[key], now[key], strict=True)):
                for field in sorted(set(a) | set(b)):
                    if a.get(field) != b.get(field):
                        out.append(f"model {k} {field}: saved {a.get(field)!r}, now {b.get(field)!r}")
        elif saved.get(key) != now.get(key):
            out.append(f"{key}: saved {saved.get(key)!r}, now {now.get(key)!r}")
    return out


class Resume:
    """The resume state of one run: read (and checked) at the start, saved every ``save_every`` counted batches.

    The engine calls :meth:`skip` before each batch (True: the batch was counted in the file; its inputs were
    verified and fingerprinted, its forward passes are skipped), :meth:`counted` after each batch it ran, and
    :meth:`finish` after the last one.
    """

    def __init__(
        self,
        path: str | Path,
        save_every: int | None,
        settings: dict[str, Any],
        models: list[str],
        labels: list[str],
        *,
        max_batches: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.save_every = save_every
        self._last_save_end = 0.0
        self._last_save_seconds = 0.0
        self.settings = settings
        self.models, self.labels = models, labels
        self.max_batches = max_batches
        self.digests: list[str] = []  # of the batches counted so far
        self.saved_state: dict[str, Any] | None = None
        self.resumed_batches = 0
        self.saves = 0
        self.plan_inputs: dict[str, Any] | None = None
        self._restored = False
        if self.path.exists():
            self._read()

    # --- reading ---
    def _refuse(self, what: str) -> ResumeStateError:
        return ResumeStateError(
            f"resume state file {str(self.path)!r} {what}. Delete it (or pass another resume_from=) to start over."
        )

    def _read(self) -> None:
        if not self.path.is_file():
            raise self._refuse("is not a file")
        raw = load_torch(self.path, "resume state file")
        try:
            if not isinstance(raw, Mapping) or raw.get("format") != FORMAT:
                raise self._refuse("is not a repsim resume state (no 'format': 'repsim-resume-state' entry)")
            if raw.get("version") != VERSION:
                raise self._refuse(f"has version {raw.get('version')!r}; this version reads {VERSION}")
            meta = json.loads(raw["meta"])
            tensors = raw["tensors"]
            if not isinstance(tensors, Mapping):
                raise TypeError("'tensors' is not a dict")
            state = _decode(meta["state"], tensors)
            digests = [str(d) for d in meta["digests"]]
            saved_settings, saved_models = meta["settings"], [str(m) for m in meta["models"]]
        except ResumeStateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise self._refuse(f"is damaged or was edited ({err!r})") from None
        differs = _differences(saved_settings, self.settings)
        if differs:
            raise self._refuse(f"was saved by a run with other settings: {'; '.join(differs)}")
        if len(saved_models) != len(self.models):
            raise self._refuse(f"was saved with {len(saved_models)} models, this run has {len(self.models)}")
        models = [
            f"{label!r} (weights fingerprint saved {old[:19]}..., now {new[:19]}...)"
            for label, old, new in zip(self.labels, saved_models, self.models, strict=True)
            if old != new
        ]
        if models:
            raise self._refuse(f"was saved with other model weights: {', '.join(models)}")
        if self.max_batches is not None and len(digests) > self.max_batches:
            raise self._refuse(
                f"counts {len(digests)} batches, more than max_batches={self.max_batches}; raise max_batches"
            )
        self.digests, self.saved_state = digests, state

    # --- the engine's hooks ---
    def skip(self, engine: Any, group: Sequence[Any], index: int) -> bool:
        """True when batch ``index`` was counted in the file: verify it, fingerprint it, skip its forwards."""
        if self.saved_state is None or index >= len(self.digests):
            return False
        found = batch_digest(group)
        if found != self.digests[index]:
            raise self._refuse(
                f"was saved from other data: batch {index} has fingerprint {found}, the file counted "
                f"{self.digests[index]} (a shuffled loader, or other data?)"
            )
        _fingerprint_inputs(engine, group)
        self.resumed_batches = index + 1
        if index + 1 == len(self.digests):
            self._restore(engine)
        return True

    def counted(self, engine: Any, group: Sequence[Any], index: int) -> None:
        """Batch ``index`` went into the accumulators: record it, and save every ``save_every`` batches."""
        if self.plan_inputs is None:
            self.plan_inputs = _plan_inputs(engine)
        self.digests.append(batch_digest(group))
        if self._due():
            self.save(engine)

    def _due(self) -> bool:
        if self.save_every is not None:
            return len(self.digests) % self.save_every == 0
        if self._saved_count < 0:  # nothing saved by this run yet
            return True
        waited = time.perf_counter() - self._last_save_end
        return waited >= max(ADAPTIVE_FACTOR * self._last_save_seconds, ADAPTIVE_MIN_SECONDS)

    def finish(self, engine: Any) -> None:
        """After the last batch: the data must have held every counted batch; save the final state."""
        if self.saved_state is not None and not self._restored:
            raise self._refuse(
                f"counts {len(self.digests)} batches, but the data yielded only {self.resumed_batches} "
                "(other data, or a smaller max_batches?)"
            )
        if engine.plan is not None and self.saves_pending():
            self.save(engine)

    def saves_pending(self) -> bool:
        return not self.path.exists() or len(self.digests) != self._saved_count

    _saved_count = -1

    # --- state ---
    def _engine_state(self, engine: Any) -> dict[str, Any]:
        return {
            "plan": {
                **(self.plan_inputs or {}),
                "estimator": engine.plan.estimator,
                "reason": engine.plan.reason,
                "memory": int(engine.plan.memory),
            },
            "dtype": str(engine.dtype).replace("torch.", ""),
            "skipped_rows": int(engine.skipped_rows),
            "kept_bytes": int(engine.kept_bytes),
            "side_n": [int(s.n) for s in engine.sides],
            "accumulators": [engine.accumulators[p].state_dict() for p in engine.pairs],
            "devices": [str(_state_device(engine.accumulators[p])) for p in engine.pairs],
        }

    def save(self, engine: Any) -> None:
        """Write the state atomically (the old file stays until the new one is complete)."""
        tensors: dict[str, torch.Tensor] = {}
        meta = {
            "settings": self.settings,
            "models": self.models,
            "digests": self.digests,
            "state": _encode(self._engine_state(engine), tensors),
        }
        payload = {"format": FORMAT, "version": VERSION, "meta": json.dumps(meta), "tensors": tensors}
        start = time.perf_counter()
        atomic_write(self.path, lambda handle: torch.save(payload, handle), mode="wb")
        self._last_save_end = time.perf_counter()
        self._last_save_seconds = self._last_save_end - start
        self.saves += 1
        self._saved_count = len(self.digests)

    def _restore(self, engine: Any) -> None:
        state = self.saved_state
        assert state is not None
        try:
            saved_plan = state["plan"]
            dtype = getattr(torch, str(state["dtype"]))
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype {state['dtype']!r}")
            # the saved choice, rebuilt (its budget was checked when it was made; the settings are the same)
            plan = choose_estimator(
                engine.measure,
                [(list(a), None if b is None else list(b)) for a, b in saved_plan["dims"]],
                n_estimate=None,
                batch_size=int(saved_plan["batch_size"]),
                itemsize=int(saved_plan["itemsize"]),
                requested=str(saved_plan["estimator"]),
                memory_budget=2**62,
            )
            plan.reason, plan.memory = str(saved_plan["reason"]), int(saved_plan["memory"])
            self.plan_inputs = {k: saved_plan[k] for k in ("dims", "batch_size", "itemsize")}
            engine.plan = plan
            accumulators = {}
            for pair, saved, device in zip(engine.pairs, state["accumulators"], state["devices"], strict=True):
                acc = plan.build(same=pair.same)
                acc.load_state_dict(saved)
                if device not in ("None", "cpu") and _device_available(device):
                    acc.to(device)
                accumulators[pair] = acc
            side_n = [int(x) for x in state["side_n"]]
            if len(side_n) != len(engine.sides):
                raise ValueError("side_n does not match the models")
        except ResumeStateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:  # RepsimError included
            raise self._refuse(f"is damaged or was edited ({err!r})") from None
        engine.dtype = dtype
        engine.accumulators = accumulators
        engine.skipped_rows = int(state["skipped_rows"])
        engine.kept_bytes = int(state["kept_bytes"])
        for side, n in zip(engine.sides, side_n, strict=True):
            side.n = n
        self._restored = True
        self._saved_count = len(self.digests)


def _plan_inputs(engine: Any) -> dict[str, Any]:
    """What the estimator choice was made from (the first batch's shapes), to rebuild it on resume."""
    dims = []
    for pair in engine.pairs:
        rows_a, rows_b = engine.rows(pair)
        dims.append(
            [
                [int(t.shape[1]) for t in rows_a.values()],
                None if rows_b is None else [int(t.shape[1]) for t in rows_b.values()],
            ]
        )
    first = next(iter((engine.sides[0].rows or {}).values()))
    return {"dims": dims, "batch_size": int(first.shape[0]), "itemsize": int(first.element_size())}


def _state_device(acc: Any) -> torch.device | None:
    find = getattr(acc, "_state_device", None)
    return find() if callable(find) else None


def _device_available(device: str) -> bool:
    try:
        d = torch.device(device)
    except RuntimeError:
        return False
    return d.type != "cuda" or (torch.cuda.is_available() and (d.index or 0) < torch.cuda.device_count())


def _fingerprint_inputs(engine: Any, group: Sequence[Any]) -> None:
    """What the engine's forward step hashes of a batch (inputs and labels per stream), without the forwards."""
    seen = set()
    for side in engine.sides:
        if side.stream in seen:
            continue
        seen.add(side.stream)
        inputs, labels = side.recorder.adapter.split_batch(group[side.stream])
        if engine.data_hashes[side.stream] is not None:
            digest(engine.data_hashes[side.stream], inputs)
        if labels is not None:
            digest(engine.label_hashes[side.stream], labels)


def open_resume(
    path: str | Path | None,
    save_every: int | None,
    sides: Sequence[Any],
    pairs: Sequence[Any],
    measure: Any,
    *,
    estimator: str,
    memory_budget: int,
    n_streams: int,
    max_batches: int | None,
    extra: Mapping[str, Any] | None = None,
) -> Resume | None:
    """The :class:`Resume` of a run (None without ``resume_from``); reads and checks an existing state file."""
    if path is None:
        if save_every is not None:
            raise RepsimError("save_every= needs resume_from=: pass the path of the state file to save to.")
        return None
    if not isinstance(path, str | Path):
        raise RepsimError(f"resume_from must be a path (str or pathlib.Path), got {type(path).__name__}.")
    if save_every is not None and (isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1):
        raise RepsimError(f"save_every must be a positive int (save the state every k batches), got {save_every!r}.")
    if dist.world_size() > 1:
        raise RepsimError(
            "resume_from= is not supported under torch.distributed yet (each rank would need its own file); "
            "run without it, or on one process."
        )
    if Path(path).is_dir():
        raise RepsimError(f"resume_from {str(path)!r} is a folder; give the path of a file, e.g. 'run.state.pt'.")
    settings = _settings(
        sides, pairs, measure, estimator=estimator, memory_budget=memory_budget, n_streams=n_streams, extra=extra or {}
    )
    models = [s.recorder.adapter.fingerprint() for s in sides]
    return Resume(path, save_every, settings, models, [s.label for s in sides], max_batches=max_batches)
