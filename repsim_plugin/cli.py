"""The ``repsim`` command: ``repsim compare``, ``repsim audit``, ``repsim measures``, ``repsim demo``.

Models are named ``timm:NAME`` (built with ``pretrained=False``; give weights with ``--checkpoint-*``),
``hf:PATH`` (a local HuggingFace model folder, loaded offline) or ``module:pkg.mod:factory`` (any callable returning an
``nn.Module``); each may carry keyword arguments after a comma, e.g. ``timm:resnet18,num_classes=10``. Data is a
folder of images, a text file with one sentence per line (for ``hf:`` models), or a ``.pt`` / ``.npy`` tensor file.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import RepsimError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


# --- models -------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model built from a spec, with what the data loaders need to feed it."""

    spec: str
    model: nn.Module
    kind: str  # "timm", "hf" or "module"
    source: str = ""  # the hf path (for its tokenizer)

    def image_config(self, image_size: int | None) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...]]:
        """(C, H, W), mean, std for image inputs: timm's data config, else 3 channels, ImageNet statistics."""
        mean, std, size = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (3, 224, 224)
        if self.kind == "timm":
            from timm.data import resolve_data_config

            cfg = resolve_data_config({}, model=self.model)
            mean, std, size = tuple(cfg["mean"]), tuple(cfg["std"]), tuple(cfg["input_size"])
        if image_size is not None:
            size = (size[0], image_size, image_size)
        return size, mean, std  # type: ignore[return-value]


def _split_kwargs(text: str) -> tuple[str, dict[str, Any]]:
    head, *pairs = text.split(",")
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise RepsimError(f"cannot read {pair!r} in {text!r}: write keyword arguments as key=value after a comma.")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return head, kwargs


def load_model(spec: str, checkpoint: str | None = None) -> LoadedModel:
    """Build a model from ``timm:NAME`` / ``hf:PATH`` / ``module:pkg.mod:factory`` and load ``checkpoint`` into it."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("timm", "hf", "module"):
        raise RepsimError(
            f"cannot read model {spec!r}: use timm:NAME, hf:PATH or module:pkg.mod:factory (e.g. timm:resnet18)."
        )
    target, kwargs = _split_kwargs(rest)
    if kind == "timm":
        try:
            import timm
        except ImportError as exc:
            raise RepsimError("timm: models need timm: pip install 'repsim-plugin[timm]'") from exc
        try:
            model = timm.create_model(target, pretrained=False, **kwargs)
        except RuntimeError as exc:
            raise RepsimError(f"timm cannot build {target!r}: {exc}") from exc
        loaded = LoadedModel(spec, model, "timm")
    elif kind == "hf":
        try:
            from transformers import AutoModel
        except ImportError as exc:
            raise RepsimError("hf: models need transformers: pip install 'repsim-plugin[hf]'") from exc
        if not Path(target).is_dir():
            raise RepsimError(f"hf:{target}: no such folder; give the path of a saved model (nothing is downloaded).")
        model = AutoModel.from_pretrained(target, local_files_only=True, **kwargs)
        loaded = LoadedModel(spec, model, "hf", source=target)
    else:
        module_name, sep, attr = target.rpartition(":")
        if not sep:
            raise RepsimError(f"cannot read {spec!r}: write module:pkg.mod:factory.")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RepsimError(f"cannot import {module_name}:{attr} for {spec!r}: {exc}") from exc
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise RepsimError(f"{module_name}:{attr}() returned a {type(model).__name__}, not a torch.nn.Module.")
        loaded = LoadedModel(spec, model, "module")
    if checkpoint is not None:
        from .compare import load_checkpoint

        try:
            loaded.model.load_state_dict(load_checkpoint(checkpoint), strict=True)
        except RuntimeError as exc:
            raise RepsimError(f"checkpoint {checkpoint!r} does not fit {spec}: {exc}") from exc
    return loaded.__class__(loaded.spec, loaded.model.eval(), loaded.kind, loaded.source)


# --- data ---------------------------------------------------------------------------------------------------------


def _image_batches(folder: Path, model: LoadedModel, image_size: int | None, batch_size: int) -> list[torch.Tensor]:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise RepsimError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    (channels, height, width), mean, std = model.image_config(image_size)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise RepsimError(f"the model takes {channels}-channel images; only 1 and 3 channels are read from files.")
    mean_t = torch.tensor(mean[:channels]).view(channels, 1, 1)
    std_t = torch.tensor(std[:channels]).view(channels, 1, 1)
    images = []
    for path in files:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode).resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).reshape(height, width, channels).permute(2, 0, 1)
        images.append((tensor - mean_t) / std_t)
    stacked = torch.stack(images)
    return list(stacked.split(batch_size))


def _text_batches(path: Path, model: LoadedModel, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    if model.kind != "hf":
        raise RepsimError(f"a text file needs hf: models (their tokenizer); {model.spec} is not one.")
    from transformers import AutoTokenizer

    sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise RepsimError(f"{path} holds no sentences (one per line).")
    tokenizer = AutoTokenizer.from_pretrained(model.source, local_files_only=True)
    batches = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start : start + batch_size]
        batch = dict(tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        # sentence indices travel as labels (never fed to the model): compare checks both models saw the same ones
        batch["labels"] = torch.arange(start, start + len(chunk))
        batches.append(batch)
    return batches


def _tensor_batches(path: Path, batch_size: int) -> list[torch.Tensor]:
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.dtype.kind not in "fiu":
            raise RepsimError(f"{path} holds {array.dtype} data; save a numeric array.")
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    else:
        try:
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RepsimError(f"cannot load {path} with torch.load(weights_only=True): {exc}") from exc
        if not isinstance(tensor, torch.Tensor):
            raise RepsimError(f"{path} must hold one tensor of inputs (n, ...), not a {type(tensor).__name__}.")
    if tensor.ndim < 1 or tensor.shape[0] == 0:
        raise RepsimError(f"{path} holds a tensor of shape {tuple(tensor.shape)}; expected (n_samples, ...).")
    if tensor.dtype == torch.float64:
        tensor = tensor.float()
    return list(tensor.split(batch_size))


def load_data(
    path: str, model: LoadedModel, *, batch_size: int, image_size: int | None = None, max_length: int = 128
) -> list[Any]:
    """Batches from a folder of images, a text file of sentences, or a ``.pt`` / ``.npy`` tensor file."""
    p = Path(path)
    if p.is_dir():
        return _image_batches(p, model, image_size, batch_size)
    if not p.is_file():
        raise RepsimError(f"data {path!r} does not exist.")
    if p.suffix in (".pt", ".pth", ".npy"):
        return _tensor_batches(p, batch_size)
    if p.suffix == ".txt":
        return _text_batches(p, model, batch_size, max_length)
    raise RepsimError(f"cannot read data {path!r}: give a folder of images, a .txt file, or a .pt / .npy tensor file.")


# --- commands -----------------------------------------------------------------------------------------------------


def _write_map(result: Any, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    written = [result.save(out.with_suffix(".json"))]
    result.plot(out.with_suffix(".png"))
    written.append(out.with_suffix(".png"))
    return written


def _layers(values: Sequence[str] | None) -> list[str] | None:
    return list(values) if values else None


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare, compare_checkpoints

    common = {
        "measure": args.measure,
        "estimator": args.estimator,
        "tokens": args.tokens,
        "spatial": args.spatial,
        "progress": not args.no_progress,
        "max_batches": args.max_batches,
        "memory_budget": args.memory_budget,
        "seed": args.seed,
    }
    out = Path(args.out)
    if args.checkpoints:
        if not args.model:
            raise RepsimError("--checkpoints needs --model: the architecture the checkpoints belong to.")
        first = load_model(args.model)
        data = load_data(args.data, first, batch_size=args.batch_size, image_size=args.image_size)
        maps = compare_checkpoints(
            lambda: load_model(args.model).model,
            args.checkpoints,
            data,
            reference=args.reference,
            layers=_layers(args.layers_a),
            **common,
        )
        for (name_a, name_b), result in maps.items():
            stem = f"{Path(name_a).stem}__vs__{Path(name_b).stem}"
            for path in _write_map(result, out / stem):
                print(f"wrote {path}")
            _print_summary(result)
        return 0
    if not args.model_a:
        raise RepsimError("give --model-a (and --model-b, or --checkpoints with --model).")
    model_a = load_model(args.model_a, args.checkpoint_a)
    spec_b = args.model_b or args.model_a
    model_b = model_a if (args.model_b is None and args.checkpoint_b is None) else load_model(spec_b, args.checkpoint_b)
    data = load_data(args.data, model_a, batch_size=args.batch_size, image_size=args.image_size)
    data_b = None
    if model_b.kind == "hf" and model_b.source != model_a.source and Path(args.data).suffix == ".txt":
        data_b = load_data(args.data, model_b, batch_size=args.batch_size)  # model B's own tokenizer
    result = compare(
        model_a.model,
        model_b.model,
        data,
        _layers(args.layers_a),
        _layers(args.layers_b),
        data_b=data_b,
        names=(_label(args.model_a, args.checkpoint_a), _label(spec_b, args.checkpoint_b)),
        **common,
    )
    for path in _write_map(result, out):
        print(f"wrote {path}")
    _print_summary(result)
    return 0


def _label(spec: str, checkpoint: str | None) -> str:
    return f"{spec} @ {Path(checkpoint).name}" if checkpoint else spec


def _print_summary(result: Any) -> None:
    print(f"{result.measure} ({result.estimator}, n={result.n}): {len(result.layers_a)} x {len(result.layers_b)} map")
    best = result.argmax_per_row()
    for layer, match in best.items():
        print(f"  {layer:<30} best match {match:<30} {result[layer, match]:.4f}")


def cmd_measures(args: argparse.Namespace) -> int:
    from .measures import list_measures, make
    from .measures.table import measures_table_markdown

    if args.json:
        print(json.dumps([make(mid).metadata() for mid in list_measures(args.pattern)], indent=1))
    else:
        print(measures_table_markdown(args.pattern))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(["--out", args.out] + (["--quick"] if args.quick else []))


def cmd_audit(args: argparse.Namespace) -> int:
    from .adversarial.cli import run_audit_command

    return run_audit_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repsim", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cmp = sub.add_parser("compare", help="layer x layer similarity map of two models or of checkpoints")
    cmp.add_argument("--model-a", help="timm:NAME, hf:PATH or module:pkg.mod:factory")
    cmp.add_argument("--model-b", help="as --model-a (default: the same architecture)")
    cmp.add_argument("--checkpoint-a", help="weights for model A (.safetensors, or a torch state dict)")
    cmp.add_argument("--checkpoint-b", help="weights for model B")
    cmp.add_argument("--model", help="architecture of --checkpoints")
    cmp.add_argument("--checkpoints", nargs="+", help="compare these checkpoints of --model (every pair)")
    cmp.add_argument("--reference", help="with --checkpoints: compare each checkpoint against this one only")
    cmp.add_argument("--data", required=True, help="image folder, .txt of sentences, or .pt / .npy tensor file")
    cmp.add_argument("--layers-a", nargs="+", help="layer names or globs (default: the adapter's blocks)")
    cmp.add_argument("--layers-b", nargs="+", help="layer names or globs for model B")
    cmp.add_argument("--measure", default="cka", help="measure id or alias (see `repsim measures`)")
    cmp.add_argument(
        "--estimator", default="auto", choices=["auto", "feature_streaming", "sample_space", "minibatch", "captured"]
    )
    cmp.add_argument("--tokens", default="mean", choices=["mean", "cls", "last", "flatten", "as_samples"])
    cmp.add_argument("--spatial", default="flatten", choices=["flatten", "mean", "as_samples"])
    cmp.add_argument("--batch-size", type=int, default=32)
    cmp.add_argument("--image-size", type=int, help="resize images to this size (default: the model's)")
    cmp.add_argument("--max-batches", type=int)
    cmp.add_argument("--memory-budget", default="4GiB")
    cmp.add_argument("--seed", type=int)
    cmp.add_argument("--out", default="repsim-map", help="output path without suffix: writes .json and .png")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.set_defaults(func=cmd_compare)

    meas = sub.add_parser("measures", help="list the registered measures with their metadata")
    meas.add_argument("pattern", nargs="?", default="*", help="glob over ids and aliases, e.g. 'cka*'")
    meas.add_argument("--json", action="store_true", help="full metadata as JSON")
    meas.set_defaults(func=cmd_measures)

    demo = sub.add_parser("demo", help="the offline demo: compare two digits CNNs and audit the claim")
    demo.add_argument("--out", default="out", help="folder for the map, the report and the plots")
    demo.add_argument("--quick", action="store_true", help="a shorter run (fewer optimisation steps)")
    demo.set_defaults(func=cmd_demo)

    try:
        from .adversarial.cli import add_audit_parser
    except ImportError:  # pragma: no cover - the audit command arrives with the adversarial module
        pass
    else:
        add_audit_parser(sub, cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``repsim`` console script; returns the exit status (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RepsimError as exc:
        print(f"repsim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
