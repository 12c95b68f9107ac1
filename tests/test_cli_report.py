"""The command line as a new user meets it: help with defaults and examples, ``repsim layers``, measure errors,
the null baseline and bias note in ``compare``'s table, ``--report DIR`` pages, and ``--permutations``."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from digits_models import train_digits_cnn
from html_pages import read_page

import repsim_plugin as rp
from repsim_plugin.cli import build_parser, main
from repsim_plugin.cli.compare import DEFAULT_MEASURE

DIGITS = "module:repsim_plugin.digits:build_digits_cnn"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpts")
    a, (_, _, Xte, _) = train_digits_cnn(seed=0)
    b, _ = train_digits_cnn(seed=1)
    torch.save(a.state_dict(), folder / "early.pt")
    torch.save(b.state_dict(), folder / "late.pt")
    np.save(folder / "x.npy", Xte[:96].numpy())
    return folder


def test_compare_help_has_a_description_defaults_and_examples(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "examples:" in text and "--report report/" in text and "repsim layers" in text
    assert f"(default: {DEFAULT_MEASURE}" in text and "(default: 32)" in text and "(default: 4GiB)" in text
    parser = build_parser()
    compare = next(a for a in parser._subparsers._actions if a.dest == "command").choices["compare"]
    for action in compare._actions:
        assert action.help, action.dest  # every flag says what it does


def test_layers_lists_names_and_marks_the_defaults(capsys):
    assert main(["layers", DIGITS]) == 0
    out = capsys.readouterr().out
    assert "default layers (8, marked *): conv1 relu1" in out
    assert "* relu3" in out and "Linear" in out
    assert main(["layers", DIGITS, "--defaults"]) == 0
    assert capsys.readouterr().out.split() == rp.adapters.for_model(train_digits_cnn(0)[0]).default_layers()


def test_an_empty_measures_match_is_an_error_with_suggestions(capsys):
    assert main(["measures", "ckaa"]) == 2
    err = capsys.readouterr().err
    assert "no measure matches 'ckaa'" in err and "'cka'" in err


def test_compare_report_on_a_checkpoint_pair(checkpoints, tmp_path, capsys):
    argv = [
        "compare", "--model", DIGITS, "--checkpoints", str(checkpoints / "early.pt"), str(checkpoints / "late.pt"),
        "--data", str(checkpoints / "x.npy"), "--layers-a", "relu1", "relu2", "relu3", "--measure", "cka",
        "--out", str(tmp_path / "maps"), "--report", str(tmp_path / "report"), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "null" in out and "note: biased CKA is inflated at n=96" in out and "--measure debiased_cka" in out
    assert f"report: {(tmp_path / 'report' / 'index.html').resolve()}" in out
    index = read_page(tmp_path / "report" / "index.html")
    assert "early__vs__late.html" in index.urls
    page = read_page(tmp_path / "report" / "early__vs__late.html")
    result = rp.SimilarityMap.load(tmp_path / "report" / "early__vs__late.json")
    assert len(page.images) == 1 and result.null_baseline is not None
    rows = page.tables[0][1:]
    assert [float(r[2]) for r in rows] == pytest.approx(result.values.reshape(-1).tolist(), abs=5e-5)


def test_permutations_flag_follows_what_compare_accepts(checkpoints, tmp_path, capsys):
    argv = [
        "compare", "--model-a", DIGITS, "--checkpoint-a", str(checkpoints / "early.pt"), "--checkpoint-b",
        str(checkpoints / "late.pt"), "--data", str(checkpoints / "x.npy"), "--layers-a", "relu3", "fc2",
        "--permutations", "20", "--seed", "0", "--out", str(tmp_path / "m"), "--no-progress",
    ]  # fmt: skip
    code = main(argv)
    if "permutations" in inspect.signature(rp.compare).parameters:
        assert code == 0
        assert rp.SimilarityMap.load(tmp_path / "m.json").p_values is not None
    else:
        assert code == 2 and "--permutations is not available yet" in capsys.readouterr().err


def test_audit_report_writes_a_page(checkpoints, tmp_path, capsys):
    data = tmp_path / "x.pt"
    torch.save(torch.from_numpy(np.load(checkpoints / "x.npy")), data)
    argv = [
        "audit", "--model-a", DIGITS, "--checkpoint-a", str(checkpoints / "early.pt"), "--checkpoint-b",
        str(checkpoints / "late.pt"), "--layer-a", "relu3", "--data", str(data), "--steps", "0",
        "--measures", "cka", "mean_cca", "--out", str(tmp_path / "audit"), "--report", str(tmp_path / "page"),
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    assert f"report: {(tmp_path / 'page' / 'index.html').resolve()}" in capsys.readouterr().out
    page = read_page(tmp_path / "page" / "index.html")
    assert len(page.images) == 1 and (tmp_path / "page" / "audit.png").exists()
    assert (tmp_path / "page" / "audit.json").exists() and page.tables[0][0][:3] == ["change", "outputs kept", "cka"]
