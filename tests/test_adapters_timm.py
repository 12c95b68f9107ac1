"""Capture on real timm models built with pretrained=False, checked against timm's own forward_intermediates."""

from __future__ import annotations

import pytest
import torch
from repsim_plugin.adapters import TimmAdapter, for_model

from repsim_plugin.capture import capture

timm = pytest.importorskip("timm")


def intermediates(model: torch.nn.Module, x: torch.Tensor, **kwargs: object) -> list:
    with torch.no_grad():
        return model.forward_intermediates(x, intermediates_only=True, **kwargs)


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=False).eval()


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    """A ViT with a class token and 2 register tokens: 3 prefix tokens before the 16 patches."""
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, reg_tokens=2).eval()


@pytest.fixture(scope="module")
def swin() -> torch.nn.Module:
    """A small swin (channels-last stages)."""
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=56,
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 4, 8),
    ).eval()


def test_resnet_stages_equal_forward_intermediates(resnet: torch.nn.Module) -> None:
    adapter = for_model(resnet)
    assert isinstance(adapter, TimmAdapter)
    assert adapter.default_layers() == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert adapter.spatial_layout == "NCHW" and adapter.num_prefix_tokens == 0
    x = torch.randn(2, 3, 64, 64)
    maps = intermediates(resnet, x)
    with (
        capture(resnet, spatial="flatten") as flat,
        capture(resnet, spatial="mean") as mean,
        capture(resnet, spatial="as_samples") as positions,
    ):
        resnet(x)
    assert flat.layers == adapter.default_layers()
    for name, fmap in zip(flat.layers, maps, strict=True):
        batch, channels, height, width = fmap.shape
        assert flat.activations[name].shape == (batch, channels * height * width)
        torch.testing.assert_close(flat.activations[name], fmap.flatten(1), rtol=0, atol=0)
        torch.testing.assert_close(mean.activations[name], fmap.mean((2, 3)), rtol=1e-6, atol=1e-6)
        expected_rows = fmap.permute(0, 2, 3, 1).reshape(-1, channels)
        torch.testing.assert_close(positions.activations[name], expected_rows, rtol=0, atol=0)
    assert flat.policy["layout"] == dict.fromkeys(flat.layers, "NCHW")
    assert positions.policy["rows"] == dict.fromkeys(flat.layers, "position")


def test_vit_prefix_tokens_are_left_out_of_mean_flatten_and_samples(vit: torch.nn.Module) -> None:
    adapter = for_model(vit)
    assert adapter.num_prefix_tokens == 3
    assert adapter.default_layers() == [f"blocks.{i}" for i in range(12)]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps, prefixes = zip(
            *vit.forward_intermediates(x, intermediates_only=True, return_prefix_tokens=True), strict=True
        )
    layers = ["blocks.0", "blocks.5", "blocks.11"]
    recs = {}
    with (
        capture(vit, layers, tokens="mean") as recs["mean"],
        capture(vit, layers, tokens="cls") as recs["cls"],
        capture(vit, layers, tokens="flatten") as recs["flatten"],
        capture(vit, layers, tokens="as_samples") as recs["as_samples"],
    ):
        vit(x)
    for name in layers:
        index = int(name.split(".")[1])
        patches = maps[index]  # (B, C, 4, 4): patch tokens only
        tokens = patches.flatten(2).transpose(1, 2)  # (B, 16, C) in token order
        assert patches.shape == (2, 192, 4, 4) and prefixes[index].shape == (2, 3, 192)
        torch.testing.assert_close(recs["mean"].activations[name], patches.mean((2, 3)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(recs["cls"].activations[name], prefixes[index][:, 0], rtol=0, atol=0)
        torch.testing.assert_close(recs["flatten"].activations[name], tokens.flatten(1), rtol=0, atol=0)
        torch.testing.assert_close(recs["as_samples"].activations[name], tokens.reshape(-1, 192), rtol=0, atol=0)
    assert recs["mean"].policy["prefix_tokens"] == dict.fromkeys(layers, 3)
    assert recs["as_samples"].num_rows == dict.fromkeys(layers, 32)


def test_vit_patch_embed_has_no_prefix_tokens(vit: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        patches = vit.patch_embed(x)
    assert patches.shape == (2, 16, 192)
    with capture(vit, "patch_embed", tokens="mean") as rec:
        vit(x)
    assert rec.policy["layout"] == {"patch_embed": "NLC"} and rec.policy["prefix_tokens"] == {"patch_embed": 0}
    torch.testing.assert_close(rec.activations["patch_embed"], patches.mean(1), rtol=1e-6, atol=1e-6)


def test_swin_channels_last_stages_equal_forward_intermediates(swin: torch.nn.Module) -> None:
    adapter = for_model(swin)
    assert adapter.spatial_layout == "NHWC"
    assert adapter.default_layers() == ["layers.0", "layers.1", "layers.2", "layers.3"]
    x = torch.randn(2, 3, 56, 56)
    maps = intermediates(swin, x)  # timm converts to NCHW here
    with torch.no_grad():
        raw = swin.layers[0](swin.patch_embed(x))
    assert raw.shape == (2, 14, 14, 24)  # the stage itself is channels-last
    with (
        capture(swin, spatial="flatten") as flat,
        capture(swin, spatial="mean") as mean,
        capture(swin, spatial="as_samples") as positions,
    ):
        swin(x)
    for name, fmap in zip(flat.layers, maps, strict=True):
        torch.testing.assert_close(flat.activations[name], fmap.flatten(1), rtol=0, atol=0)
        torch.testing.assert_close(mean.activations[name], fmap.mean((2, 3)), rtol=1e-5, atol=1e-6)
        channels = fmap.shape[1]
        torch.testing.assert_close(
            positions.activations[name], fmap.permute(0, 2, 3, 1).reshape(-1, channels), rtol=0, atol=0
        )
    assert flat.policy["layout"] == dict.fromkeys(flat.layers, "NHWC")


def test_features_only_wrapper_uses_feature_info(resnet: torch.nn.Module) -> None:
    model = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 3)).eval()
    assert for_model(model).default_layers() == ["layer1", "layer3"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        features = model(x)
    with capture(model) as rec:
        model(x)
    for name, fmap in zip(rec.layers, features, strict=True):
        torch.testing.assert_close(rec.activations[name], fmap.flatten(1), rtol=0, atol=0)


def test_timm_batches_and_main_output(resnet: torch.nn.Module) -> None:
    adapter = for_model(resnet)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    inputs, labels = adapter.split_batch((x, y))
    assert inputs is x and labels is y
    with capture(resnet, ["fc"]) as rec:
        out = rec.forward((x, y))
    assert adapter.main_output(out).shape == (2, 1000)
    torch.testing.assert_close(rec.activations["fc"], out)
    assert adapter.fingerprint() == for_model(resnet).fingerprint()
