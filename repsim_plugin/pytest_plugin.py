"""pytest plugin (entry point ``pytest11`` "repsim"): representation snapshot tests.

The fixture ``repsim_snapshot`` stores what chosen layers of a model compute on fixed inputs, next to the test in
``__repsim_snapshots__/`` (the rows as safetensors, plus a small JSON of layer names, reduction policy, measure,
input fingerprint and library versions: nothing is pickled), and later fails when a layer's similarity to its
snapshot falls below a threshold::

    def test_encoder_is_stable(repsim_snapshot):
        model = build_model()
        repsim_snapshot.assert_match(model, inputs, ["encoder.layer.*"], min_similarity=0.99)

``pytest --repsim-update`` writes (or rewrites) the snapshots; a missing snapshot fails and says so. Defaults come
from the ini file: ``repsim_measure`` (``cka``), ``repsim_min_similarity`` (0.99), ``repsim_snapshot_warn_mb`` (5).
The module imports only pytest at load time (and the package, which imports torch); the capture, the measures'
machinery and safetensors are used only by a test that requests the fixture. ``-p no:repsim`` turns it off.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

SNAPSHOT_DIR = "__repsim_snapshots__"
FORMAT = 1


class SnapshotSizeWarning(UserWarning):
    """A representation snapshot is larger than ``repsim_snapshot_warn_mb``."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("repsim", "representation snapshots (repsim-plugin)")
    group.addoption(
        "--repsim-update",
        action="store_true",
        default=False,
        help="write or rewrite the representation snapshots of repsim_snapshot.assert_match",
    )
    parser.addini("repsim_measure", "default measure of repsim_snapshot (an id or alias)", default="cka")
    parser.addini("repsim_min_similarity", "default threshold of repsim_snapshot", default="0.99")
    parser.addini("repsim_snapshot_warn_mb", "warn when a snapshot file is larger than this (MB)", default="5")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "snapshot"


class RepsimSnapshot:
    """What the ``repsim_snapshot`` fixture returns: :meth:`assert_match` stores or checks one snapshot."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        config = request.config
        self.update = bool(config.getoption("--repsim-update"))
        self.default_measure = str(config.getini("repsim_measure"))
        self.default_min_similarity = float(config.getini("repsim_min_similarity"))
        self.warn_bytes = float(config.getini("repsim_snapshot_warn_mb")) * 1e6
        self._calls = 0

    def path_for(self, name: str | None = None) -> Path:
        """``__repsim_snapshots__/<test module>__<test name>[__<name>]`` (without suffix) next to the test file."""
        node = self._request.node
        base = f"{Path(str(node.path)).stem}__{_safe(node.name)}"
        if name is not None:
            base += f"__{_safe(name)}"
        elif self._calls > 1:
            base += f"__{self._calls}"
        return Path(str(node.path)).parent / SNAPSHOT_DIR / base

    def assert_match(
        self,
        model: Any,
        inputs: Any,
        layers: Any,
        measure: str | None = None,
        min_similarity: float | None = None,
        *,
        name: str | None = None,
        **capture_options: Any,
    ) -> dict[str, float]:
        """Store (first run with ``--repsim-update``) or check the rows of ``layers`` of ``model`` on ``inputs``.

        ``inputs`` is one batch (tensor, dict of model inputs) or a list of batches; ``layers`` and
        ``capture_options`` (``tokens=``, ``spatial=``, ``output=``, ...) as in :func:`repsim_plugin.capture`.
        Fails when any layer's ``measure`` similarity to its snapshot is below ``min_similarity``: the message's
        first line names the drifted layers and their values, a per-layer table follows. Several snapshots in one
        test need distinct ``name=`` (or are numbered in call order). Returns ``{layer: similarity}``.
        """
        from ._drift import as_batches, layer_rows_and_policy, per_layer, similarity_measure, verdict

        self._calls += 1
        m = similarity_measure(measure or self.default_measure)
        threshold = self.default_min_similarity if min_similarity is None else float(min_similarity)
        base = self.path_for(name)
        tensors_path, meta_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        batches = as_batches(inputs)
        fingerprint = _fingerprint(batches)
        rows, policy = layer_rows_and_policy(model, batches, layers, **capture_options)
        if self.update:
            self._write(tensors_path, meta_path, rows, m.id, policy, fingerprint)
            return dict.fromkeys(rows, 1.0)
        if not (tensors_path.is_file() and meta_path.is_file()):
            pytest.fail(
                f"no representation snapshot {tensors_path.name} in {tensors_path.parent}: run "
                "`pytest --repsim-update` once to write it (and commit the files).",
                pytrace=False,
            )
        stored, meta = _read(tensors_path, meta_path)
        problem = _mismatch(meta, list(rows), fingerprint)
        if problem:
            pytest.fail(f"representation snapshot {tensors_path.name}: {problem}; rerun with --repsim-update if "
                        "the change is intended.", pytrace=False)  # fmt: skip
        values = per_layer(m, rows, stored, meta["layers"])
        message = verdict(values, threshold, m.id, f"layers against snapshot {tensors_path.name}")
        if message is not None:
            pytest.fail(message + "\nIf the change is intended, rerun with --repsim-update.", pytrace=False)
        return values

    def _write(
        self,
        tensors_path: Path,
        meta_path: Path,
        rows: dict[str, Any],
        measure_id: str,
        policy: dict[str, Any],
        fingerprint: str,
    ) -> None:
        from safetensors.torch import save

        from ._utils.io import atomic_write, write_text
        from .results import collect_versions

        names = list(rows)
        payload = save({f"layer{i}": rows[k].float().contiguous() for i, k in enumerate(names)})
        atomic_write(tensors_path, lambda handle: handle.write(payload), mode="wb")
        meta = {
            "format": FORMAT,
            "layers": names,
            "shapes": {k: list(rows[k].shape) for k in names},
            "measure": measure_id,
            "policy": policy,
            "inputs_sha256": fingerprint,
            "versions": collect_versions(),
        }
        write_text(meta_path, json.dumps(meta, indent=1, sort_keys=True, default=str) + "\n")
        if len(payload) > self.warn_bytes:
            warnings.warn(
                f"representation snapshot {tensors_path.name} is {len(payload) / 1e6:.1f} MB (over "
                f"repsim_snapshot_warn_mb={self.warn_bytes / 1e6:g}); use fewer inputs, fewer layers, or a reducing "
                "policy (tokens='mean', spatial='mean') to keep snapshots small.",
                SnapshotSizeWarning,
                stacklevel=3,
            )


def _fingerprint(batches: list[Any]) -> str:
    from ._utils.batches import digest

    h = hashlib.sha256()
    for batch in batches:
        digest(h, batch)
    return h.hexdigest()


def _read(tensors_path: Path, meta_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ._utils.io import load_safetensors

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        pytest.fail(f"cannot read {meta_path}: {exc}; rewrite it with --repsim-update.", pytrace=False)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("layers"), list):
        pytest.fail(f"{meta_path} is not a repsim snapshot (format {FORMAT}); rewrite it with --repsim-update.",
                    pytrace=False)  # fmt: skip
    tensors = load_safetensors(tensors_path)
    stored = {name: tensors[f"layer{i}"] for i, name in enumerate(meta["layers"]) if f"layer{i}" in tensors}
    if len(stored) != len(meta["layers"]):
        pytest.fail(f"{tensors_path} lacks some layers of {meta_path.name}; rewrite it with --repsim-update.",
                    pytrace=False)  # fmt: skip
    return stored, meta


def _mismatch(meta: dict[str, Any], layers: list[str], fingerprint: str) -> str | None:
    if meta["layers"] != layers:
        return f"the layers are now {layers}, the snapshot holds {meta['layers']}"
    if meta.get("inputs_sha256") != fingerprint:
        return "the inputs differ from the snapshot's (its rows are other samples)"
    return None


@pytest.fixture
def repsim_snapshot(request: pytest.FixtureRequest) -> RepsimSnapshot:
    """Representation snapshot of a model's layers: ``repsim_snapshot.assert_match(model, inputs, layers)``."""
    return RepsimSnapshot(request)
