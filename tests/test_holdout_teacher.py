"""The offline stand-in teacher (`align-teacher=holdout`): trained on images no one else holds, cached,
knowledgeable enough that stage 3's KL term carries a signal, and shared with CLIP2FL's clients."""

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord

from alignment import holdout
from alignment.stage import alignment_stages
from flcore.config import ConfigError, validate
from flcore.data import Batches
from flcore.experiment import prepare, server_data, to_record
from flcore.models import build_model
from rounds.stage import ServerContext
from server_app.preflight import preflight
from strategies.registry import STRATEGIES

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"num-clients": 4, "projection-dim": 32, "image-size": 8, "holdout-epochs": 3}


def config(tmp_path, **overrides):
    raw = {**SMALL, "align": True, "align-teacher": "holdout", "output-dir": str(tmp_path), **overrides}
    return validate(raw, choices={"strategy": STRATEGIES})


@pytest.fixture
def trainings(monkeypatch):
    """Counts the stand-in's trainings (its weights are cached on disk after the first)."""
    calls = []
    real = holdout._train

    def counting(cfg, prepared, held):
        calls.append(len(held))
        return real(cfg, prepared, held)

    monkeypatch.setattr(holdout, "_train", counting)
    return calls


def test_stand_in_trains_once_on_images_no_client_d_align_or_test_holds(tmp_path, trainings):
    cfg = config(tmp_path)
    prep = prepare(cfg)
    held = holdout.holdout_indices(prep)
    assert len(held) > 100
    assert not np.intersect1d(held, prep.split.pool).size and not np.intersect1d(held, prep.split.align).size
    assert not any(np.intersect1d(held, client).size for client in prep.split.clients)
    first, source = holdout.load_or_train(cfg)
    again, _ = holdout.load_or_train(cfg)
    assert trainings == [len(held)]  # the second call loaded the cached weights
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in first.state_dict().items())
    assert "stand-in for CLIP" in source and "held-out" in source


def test_stand_in_is_refused_before_round_one_when_no_image_is_left_over(tmp_path):
    with pytest.raises(ConfigError, match="'align-teacher' = 'holdout'.*none is left over.*imbalance-factor = 1"):
        preflight(config(tmp_path, **{"imbalance-factor": 1.0}))
    with pytest.raises(ConfigError, match="none is left over"):  # CLIP2FL's clients use the same teacher
        preflight(config(tmp_path, **{"imbalance-factor": 1.0, "align": False, "strategy": "clip2fl"}))


def test_with_the_stand_in_beta_one_pulls_predictions_toward_q_more_than_beta_zero(tmp_path):
    def aligned(beta):
        cfg = config(
            tmp_path,
            **{"align-beta": beta, "align-steps": 12, "align-lr": 0.05, "num-server-rounds": 5, "eval-every": 2},
        )
        data = server_data(cfg)
        ctx = ServerContext(cfg, data, lambda seed=None: build_model("resnet8", 32, 10, seed=seed), None)
        stages = alignment_stages(cfg, ctx)
        outcome = stages.after_aggregation[0](1, to_record(build_model("resnet8", 32, 10, seed=3)), MetricRecord())
        model = build_model("resnet8", 32, 10)
        model.load_state_dict(outcome.arrays.to_torch_state_dict())
        return model, stages.sections["alignment"], data

    def kl_to_q(model, info, data, q):
        x, _ = next(Batches(data.align, data.dataset, 8, len(data.align)).iterate())
        with torch.no_grad():
            log_p = torch.log_softmax(model.eval()(x) / 3, 1)
        return float(
            torch.nn.functional.kl_div(log_p, torch.log_softmax(q / 3, 1), reduction="batchmean", log_target=True)
        )

    with_kl, info, data = aligned(1.0)
    ce_only, info0, _ = aligned(0.0)
    teacher, _ = holdout.load_or_train(config(tmp_path))
    q = holdout.logits(config(tmp_path), teacher, data.align)
    start = build_model("resnet8", 32, 10, seed=3)
    before = kl_to_q(start, info, data, q)
    assert info["beta-effective"] == 1.0 and info["teacher-random-weights"] is False  # not forced to 0
    assert "stand-in for CLIP" in info["teacher"] and info["teacher-test-accuracy"] > 0.3
    assert kl_to_q(with_kl, info, data, q) < min(kl_to_q(ce_only, info0, data, q), before)
    print(
        f"KL(q || p) on D_align: start {before:.3f}, beta 0 {kl_to_q(ce_only, info0, data, q):.3f}, "
        f"beta 1 {kl_to_q(with_kl, info, data, q):.3f}"
    )


def test_clip2fl_clients_distil_from_the_same_stand_in(tmp_path):
    from client_app import distill
    from flcore.experiment import client_batches

    cfg = config(tmp_path, strategy="clip2fl", align=False)
    part = client_batches(cfg, 1).data
    q = distill.teacher_logits(cfg, 1, prepare(cfg).dataset.classes, part)
    teacher, _ = holdout.load_or_train(cfg)
    assert torch.allclose(q, holdout.logits(cfg, teacher, part))
    assert q.shape == (len(part), 10)


def test_clip2fl_server_contrasts_with_the_stand_ins_classifier_rows(tmp_path):
    """The stand-in has no text tower: its unit-norm classifier rows play CLIP's text features."""
    from strategies.clip2fl import class_text_features

    cfg = config(tmp_path, strategy="clip2fl", align=False)
    preflight(cfg)  # no prompts, no embedding-size check: the stand-in is projection-dim wide
    text = class_text_features(cfg)
    teacher, _ = holdout.load_or_train(cfg)
    rows = teacher.classifier.weight.detach()
    assert text.shape == (10, 32) and torch.allclose(text.norm(dim=1), torch.ones(10))
    assert torch.allclose(text, rows / rows.norm(dim=1, keepdim=True))
