"""The offline stand-in teacher (`align-teacher=holdout`): trained on a class-balanced reserve no one else
holds, cached, knowledgeable enough that stage 3's KL term carries a signal, and shared with CLIP2FL's clients."""

import hashlib
import shutil

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord

from alignment import holdout
from alignment.stage import alignment_stages
from flcore.arrays import to_record
from flcore.batches import Batches
from flcore.config import ConfigError, validate
from flcore.models import build_model
from flcore.partition import make_split
from flcore.run_data import prepare
from flcore.server_data import server_data
from rounds.stage import ServerContext
from server_app.preflight import preflight
from tests.helpers import one_torch_thread, validated

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"num-clients": 4, "projection-dim": 32, "image-size": 8, "holdout-epochs": 15}


def config(tmp_path, **overrides):
    raw = {**SMALL, "align": True, "align-teacher": "holdout", "output-dir": str(tmp_path), **overrides}
    return validated(raw)


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


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """The cache of the stand-in of `config`'s settings, trained once for the tests that only use it."""
    out = tmp_path_factory.mktemp("stand-in")
    with one_torch_thread():
        holdout.load_or_train(config(out))
    return out / "teacher-cache"


@pytest.fixture
def cached_stand_in(trained_once, tmp_path):
    """This test's output folder starts with the stand-in's cache, as a run after the first finds it."""
    shutil.copytree(trained_once, tmp_path / "teacher-cache")


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


def test_stand_in_trains_on_as_many_images_of_every_class_also_of_the_head_class(tmp_path):
    """The images the long-tailed cut drops are a reversed long tail (IF 100 on digits: 0, 43, ..., 115): the
    reserve is drawn before the cut instead, a tenth of the smallest class (122 images) of each."""
    prep = prepare(config(tmp_path, **{"imbalance-factor": 100.0}))
    labels = prep.dataset.train.labels
    held = np.bincount(labels[holdout.holdout_indices(prep)], minlength=10)
    assert held.tolist() == [12] * 10
    assert prep.split.pool_counts(labels).tolist() == [103, 74, 44, 26, 16, 9, 5, 3, 2, 1]  # head: 115 - 12
    assert prep.split.reserve(labels) == {"train-counts": [12] * 10, "pool-cut": [12] + [0] * 9}
    assert not np.intersect1d(holdout.holdout_indices(prep), prep.split.pool).size


def test_only_the_stand_in_changes_the_pool():
    """Every other teacher keeps the pool that the recipe drew before the reserve existed."""
    default = validate({})
    assert default.data_key == validate({"holdout-per-class": 40}).data_key  # not used: no reserve
    split = prepare(default).split
    digest = hashlib.sha256(
        b"".join(a.astype(np.int64).tobytes() + b"|" for a in [split.align, split.pool, *split.clients])
    )
    assert len(split.pool) == 495 and digest.hexdigest()[:16] == "f17f1c065782c422"
    assert not len(split.holdout) and split.reserve(prepare(default).dataset.train.labels) == {}


def test_a_reserve_a_class_cannot_give_is_refused_before_round_one(tmp_path):
    """Digits' smallest class has 122 training images, 112 after D_align: a reserve must leave it one."""
    with pytest.raises(ConfigError, match=r"'holdout-per-class' = 112 is not allowed.*class 8 has 112.*from 1 to 111"):
        preflight(config(tmp_path, **{"holdout-per-class": 112}))
    with pytest.raises(ConfigError, match="'holdout-per-class' = 112"):  # CLIP2FL's clients use the same teacher
        preflight(config(tmp_path, **{"holdout-per-class": 112, "align": False, "strategy": "clip2fl"}))
    with pytest.raises(ConfigError, match=r"'holdout-per-class' = 'auto' \(= 1\).*class 1 has 1 "):
        make_split(np.repeat(np.arange(3), [12, 11, 11]), 3, 1.0, 10, 1, 0.5, 1, 0, holdout="auto")
    with pytest.raises(ConfigError, match="'holdout-per-class' = 0 is not allowed: expected auto or an integer >= 1"):
        config(tmp_path, **{"holdout-per-class": 0})


def test_imbalance_factor_one_leaves_the_reserve_to_the_stand_in_and_every_other_image_to_the_clients(tmp_path):
    prep = prepare(config(tmp_path, **{"imbalance-factor": 1.0, "holdout-per-class": 5}))
    labels = prep.dataset.train.labels
    assert np.bincount(labels[prep.split.holdout]).tolist() == [5] * 10
    assert (prep.split.pool_counts(labels) == np.bincount(labels) - 10 - 5).all()
    assert prep.split.pool_cut.tolist() == [5] * 10


def test_a_server_whose_nodes_hold_their_own_data_reserves_a_balanced_set_of_its_training_split(tmp_path):
    prep = prepare(config(tmp_path, **{"client-data": "local", "align-data": "train"}))
    labels = prep.dataset.train.labels
    assert np.bincount(labels[prep.split.holdout]).tolist() == [12] * 10
    assert not np.intersect1d(prep.split.holdout, prep.split.align).size
    assert prep.split.reserve(labels) == {"train-counts": [12] * 10}  # no pool, so nothing it gave up
    holdout.check(config(tmp_path, **{"client-data": "local", "align-data": "train"}), prep)


@pytest.mark.usefixtures("flower_identity")
def test_partition_and_summary_report_the_reserve_and_the_stand_ins_test_accuracy(tmp_path):
    import json

    from server_app import app as server_app
    from tests.helpers import ClientAppGrid

    overrides = {"num-clients": 2, "fraction-train": 1.0, "num-server-rounds": 1, "local-epochs": 1}
    cfg = config(tmp_path, **overrides, **{"imbalance-factor": 100.0, "align-steps": 1})
    summary = server_app.run(ClientAppGrid(cfg), cfg, "teacher")
    partition = json.loads((tmp_path / "teacher" / "partition.json").read_text())
    assert partition["holdout-reserve"] == {"train-counts": [12] * 10, "pool-cut": [12] + [0] * 9}
    assert partition["pool-counts"][0] == 115 - 12
    section = summary["holdout-teacher"]
    assert section["train-counts"] == [12] * 10 and section["pool-cut"] == [12] + [0] * 9
    assert section["holdout-per-class"] == "auto" and "stand-in for CLIP" in section["teacher"]
    assert 0.1 < section["test-accuracy"] <= 1 and len(section["per-class-test-accuracy"]) == 10
    assert section["test-accuracy"] == pytest.approx(summary["alignment"]["teacher-test-accuracy"])
    assert json.loads((tmp_path / "teacher" / "holdout-teacher.json").read_text()) == section


def test_imagenet_lt_refuses_the_stand_in_whose_reserve_would_take_its_tail(tmp_path):
    with pytest.raises(ConfigError, match="'align-teacher' = 'holdout' is not allowed for dataset 'imagenet-lt'"):
        config(tmp_path, dataset="imagenet-lt", **{"imbalance-factor": 1.0, "data-dir": str(tmp_path)})


@pytest.mark.usefixtures("cached_stand_in")
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


@pytest.mark.usefixtures("cached_stand_in")
def test_clip2fl_clients_distil_from_the_same_stand_in(tmp_path):
    from client_app import distill
    from flcore.run_data import client_batches

    cfg = config(tmp_path, strategy="clip2fl", align=False)
    part = client_batches(cfg, 1).data
    q = distill.teacher_logits(cfg, 1, prepare(cfg).dataset.classes, part)
    teacher, _ = holdout.load_or_train(cfg)
    assert torch.allclose(q, holdout.logits(cfg, teacher, part))
    assert q.shape == (len(part), 10)


@pytest.mark.usefixtures("cached_stand_in")
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
