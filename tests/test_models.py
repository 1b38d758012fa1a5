import torch

from flcore.models import build_model


def conv(cin, cout, k):
    return cin * cout * k * k


def bn(c):
    return 2 * c


def test_resnet8_shapes_and_parameter_count():
    model = build_model("resnet8", projection_dim=512, num_classes=10, seed=0)
    x = torch.randn(4, 3, 32, 32)
    assert model.features(x).shape == (4, 256)
    assert model.embed(x).shape == (4, 512)
    assert model(x).shape == (4, 10)
    stem = conv(3, 64, 3) + bn(64)
    block1 = 2 * (conv(64, 64, 3) + bn(64))
    block2 = conv(64, 128, 3) + conv(128, 128, 3) + 2 * bn(128) + conv(64, 128, 1) + bn(128)
    block3 = conv(128, 256, 3) + conv(256, 256, 3) + 2 * bn(256) + conv(128, 256, 1) + bn(256)
    backbone = stem + block1 + block2 + block3
    assert sum(p.numel() for p in model.backbone.parameters()) == backbone == 1_225_024
    head = (256 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == backbone + head


def test_resnet8_accepts_other_input_sizes_and_is_seeded():
    a = build_model("resnet8", 64, 5, seed=1)
    b = build_model("resnet8", 64, 5, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert a(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_resnet50_backbone_has_2048_features():
    model = build_model("resnet50", projection_dim=768, num_classes=7, seed=0)
    model.eval()
    x = torch.randn(1, 3, 64, 64)
    assert model.features(x).shape == (1, 2048)
    assert model(x).shape == (1, 7)
