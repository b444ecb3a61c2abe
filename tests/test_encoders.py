"""Encoders section: the registry, output shapes, parameter counts, gradients to the stem,
and the normalisation options."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import cpc_utils as cu

# name: (D at width 64, parameters at width 64 with LayerNorm, D / width)
EXPECTED = {
    "resnet18v2": (256, 2_782_016, 4),
    "resnet50v2": (1024, 8_539_712, 16),
    "densenet": (1024, 4_269_312, 16),
}


def test_registry_names():
    assert set(cu.ENCODERS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_parameter_count_and_dim_at_width_64(name):
    enc = cu.build_encoder(name)  # building and counting is cheap; one small forward checks D
    dim, params, _ = EXPECTED[name]
    assert enc.out_dim == dim
    assert cu.count_parameters(enc) == params
    with torch.no_grad():
        assert enc(torch.randn(2, 3, 32, 32)).shape == (2, dim)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_output_shape_and_gradient_reaches_stem(name):
    enc = cu.build_encoder(name, width=8)
    assert enc.out_dim == 8 * EXPECTED[name][2]
    x = torch.randn(5, 3, 16, 16)
    z = enc(x)
    assert z.shape == (5, enc.out_dim) and torch.isfinite(z).all()
    (z * torch.randn_like(z)).sum().backward()
    stem = enc.stem[0]
    assert isinstance(stem, nn.Conv2d) and stem.in_channels == 3
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("norm, layer_type", [("layer", cu.LayerNorm2d), ("group", nn.GroupNorm),
                                               ("batch", nn.BatchNorm2d), ("none", None)])
def test_every_norm_builds(name, norm, layer_type):
    enc = cu.build_encoder(name, norm=norm, width=8)
    norms = [m for m in enc.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm))]
    if layer_type is None:
        assert norms == []
    else:
        assert norms and all(type(m) is layer_type for m in norms)
    if norm == "layer":
        assert all(m.num_groups == 1 for m in norms)
    if norm == "group":
        assert any(m.num_groups > 1 for m in norms)
        assert all(m.num_channels % m.num_groups == 0 for m in norms)
    z = enc(torch.randn(2, 3, 16, 16))
    assert z.shape == (2, enc.out_dim) and torch.isfinite(z).all()


def test_in_channels():
    enc = cu.build_encoder("resnet18v2", width=8, in_channels=1)
    assert enc(torch.randn(2, 1, 16, 16)).shape == (2, 32)


def test_width_scales_parameters():
    small, large = (cu.count_parameters(cu.build_encoder("resnet18v2", width=w)) for w in (8, 16))
    assert 3.5 < large / small < 4.5  # convolutions dominate: parameters grow with width ** 2


def test_unknown_encoder_names_the_options():
    with pytest.raises(ValueError) as e:
        cu.build_encoder("vgg16")
    assert "vgg16" in str(e.value)
    assert all(name in str(e.value) for name in cu.ENCODERS)


def test_unknown_norm_names_the_options():
    with pytest.raises(ValueError) as e:
        cu.build_encoder("resnet18v2", norm="instance", width=8)
    assert "instance" in str(e.value)
    assert all(opt in str(e.value) for opt in ("layer", "group", "batch", "none"))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_layer_norm_embedding_does_not_depend_on_the_batch(name):
    """LayerNorm keeps each patch independent: a patch embeds the same alone or in a batch."""
    enc = cu.build_encoder(name, norm="layer", width=8).train()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(enc(x)[2:3], enc(x[2:3]), atol=1e-5)


def test_batch_norm_embedding_depends_on_the_batch():
    """The contrast to the test above, so that test can tell the two apart."""
    enc = cu.build_encoder("resnet18v2", norm="batch", width=8).train()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(enc(x)[2:4], enc(x[2:4]), atol=1e-3)


# ---- stems ---------------------------------------------------------------------------

# stem: (stem output side, last stage map side) for a 32 px patch
STEM_MAPS = {"imagenet": (8, 2), "imagenet_norm": (8, 2), "small": (16, 4)}


def test_stem_choices():
    assert set(cu.STEMS) == set(STEM_MAPS)


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("stem", list(STEM_MAPS))
def test_stem_map_sizes_dim_and_gradient(name, stem):
    enc = cu.build_encoder(name, width=8, stem=stem)
    x = torch.randn(3, 3, 32, 32)
    h = enc.stem(x)
    assert h.shape == (3, 8, *(2 * [STEM_MAPS[stem][0]]))
    assert enc.stages(h).shape == (3, enc.out_dim, *(2 * [STEM_MAPS[stem][1]]))
    assert enc.out_dim == 8 * EXPECTED[name][2]
    z = enc(x)
    assert z.shape == (3, enc.out_dim) and torch.isfinite(z).all()
    (z * torch.randn_like(z)).sum().backward()
    assert isinstance(enc.stem[0], nn.Conv2d) and enc.stem[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize("stem, layers", [
    ("imagenet", [nn.Conv2d, nn.MaxPool2d]),
    ("imagenet_norm", [nn.Conv2d, cu.LayerNorm2d, nn.ReLU, nn.MaxPool2d]),
    ("small", [nn.Conv2d, cu.LayerNorm2d, nn.ReLU, nn.MaxPool2d])])
def test_stem_layers(stem, layers):
    s = cu.build_encoder("resnet18v2", width=8, stem=stem).stem
    assert [type(m) for m in s] == layers
    assert s[0].kernel_size == ((3, 3) if stem == "small" else (7, 7))
    assert s[0].stride == ((1, 1) if stem == "small" else (2, 2))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_imagenet_stem_keeps_the_state_dict_keys(name):
    """The default stem is the old one, layer for layer: checkpoints trained before `stem` load."""
    default, imagenet = cu.build_encoder(name, width=8), cu.build_encoder(name, width=8, stem="imagenet")
    assert list(default.state_dict()) == list(imagenet.state_dict())
    assert [k for k in default.state_dict() if k.startswith("stem.")] == ["stem.0.weight"]
    imagenet.load_state_dict(default.state_dict())
    with_norm = cu.build_encoder(name, width=8, stem="imagenet_norm").state_dict()
    assert [k for k in with_norm if k.startswith("stem.")] == ["stem.0.weight", "stem.1.weight", "stem.1.bias"]


def test_unknown_stem_names_the_options():
    with pytest.raises(ValueError) as e:
        cu.build_encoder("resnet18v2", width=8, stem="cifar")
    assert "cifar" in str(e.value) and all(s in str(e.value) for s in cu.STEMS)


def test_configs_pass_the_stem_to_the_encoders():
    assert cu.CPCConfig().stem == cu.CPCADConfig().stem == "imagenet"
    grid = cu.PatchGrid(64, 16, 8)
    cpc = cu.CPC(cu.CPCConfig(width=8, stem="small", context_dim=16, context_layers=1, pred_steps=1), grid)
    cpcad = cu.CPCAD(cu.CPCADConfig(width=8, stem="small", shared_encoder=False), grid)
    for enc in [cpc.encoder, *cpcad.encoders]:
        assert enc.stem[0].kernel_size == (3, 3)
