import pytest
import torch

from flcore.config import HEAD_NAMES, ConfigError
from flcore.models import (
    HEADS,
    METHOD_HEADS,
    buffer_names,
    build_model,
    classifier_width,
    model_head,
    run_model,
)
from tests.helpers import validated


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


def linears(module):
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fednova", "ccvr", "creff", "feddf", "fedbe"])
def test_baselines_train_resnet8_with_a_linear_classifier_on_its_256_features(strategy):
    """CReFF's code base trains ResNet-8 -> Linear(256, C) for CReFF and its baselines: no projection."""
    cfg = validated(strategy=strategy)
    model = run_model(cfg, 10, seed=0)
    assert model_head(cfg) == "none" and classifier_width(cfg) == 256
    assert linears(model) == [(256, 10)] and not any(k.startswith("projection.") for k in model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model.embed(x), model.features(x)) and model(x).shape == (2, 10)


def test_clip2fl_trains_its_256_to_512_linear_before_the_classifier():
    cfg = validated(strategy="clip2fl")
    model = run_model(cfg, 10, seed=0)
    assert model_head(cfg) == "linear" and classifier_width(cfg) == 512
    assert linears(model) == [(256, 512), (512, 10)]
    assert model.embed(torch.randn(2, 3, 16, 16)).shape == (2, 512)


@pytest.mark.parametrize("stages", [{"pretrain": True}, {"align": True}, {"pretrain": True, "align": True}])
@pytest.mark.parametrize("strategy", ["fedavg", "creff", "clip2fl"])
def test_ours_keeps_the_papers_mlp_with_any_strategy(stages, strategy):
    cfg = validated(strategy=strategy, **stages)
    assert model_head(cfg) == "mlp" and classifier_width(cfg) == 512
    model = run_model(cfg, 10, seed=0)
    assert linears(model) == [(256, 512), (512, 512), (512, 10)]
    assert isinstance(model.projection[1], torch.nn.GELU)


def test_an_explicit_head_wins_over_the_methods_model():
    assert model_head(validated(strategy="creff", head="mlp")) == "mlp"
    assert model_head(validated(strategy="fedavg", head="linear", projection_dim=64)) == "linear"
    assert model_head(validated(pretrain=True, head="none")) == "none"
    assert classifier_width(validated(model="resnet50", head="none", image_size=64)) == 2048
    with pytest.raises(ConfigError, match="'head' = 'wide'.*auto, mlp, linear, none"):
        validated(head="wide")


def test_every_registered_strategy_names_its_reference_model():
    from strategies.registry import STRATEGIES

    assert set(METHOD_HEADS) == set(STRATEGIES)
    assert set(METHOD_HEADS.values()) <= set(HEADS)
    assert set(HEADS) | {"auto"} == set(HEAD_NAMES)


def test_auto_refuses_a_strategy_without_a_reference_model():
    cfg = validated().with_(strategy="mystery")
    with pytest.raises(ConfigError, match="'head' = 'auto'.*'mystery'.*METHOD_HEADS"):
        model_head(cfg)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_buffers_and_memory_follow_the_head(head):
    from flcore.memory import estimate

    names = buffer_names("resnet8", 16, head)
    model = build_model("resnet8", 16, 10, head=head)
    assert names == set(model.state_dict()) - {n for n, _ in model.named_parameters()}
    params = sum(p.numel() for p in model.parameters())
    assert estimate("resnet8", 16, 10, 16, 4, head).parameters == params


def test_without_a_projection_projection_dim_costs_nothing():
    """The memory check reads the run's model: a huge projection-dim is refused only where a head uses it."""
    from flcore.memory import check_memory

    check_memory(validated(projection_dim=100_000_000), 10, available=2**30)
    with pytest.raises(ConfigError, match="'projection-dim' = 100000000.*head=mlp"):
        check_memory(validated(projection_dim=100_000_000, head="mlp"), 10, available=2**30)
