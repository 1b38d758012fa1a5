"""Stage 3 (global alignment): loss, teacher logits and their cache, input checks, the stage, any strategy.

Every teacher here is the tiny open_clip config with RANDOM weights (or logits written by the test): no
model hub is reached and no test claims the teacher knows anything.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord
from flwr.serverapp.strategy import FedProx

from alignment import teacher as clip_teacher
from alignment.logits import check_class_names
from alignment.loss import AlignSettings, fine_tune
from alignment.stage import alignment_stages
from flcore.arrays import load_record, to_record
from flcore.batches import Batches
from flcore.config import ConfigError, WeightsNotFound, validate
from flcore.metrics import summarize
from flcore.models import build_model
from flcore.reports import RunReport, read_metrics, read_summary
from flcore.run_data import prepare
from flcore.server_data import server_data
from flcore.training import TrainSettings, predict, train
from rounds.stage import ServerContext
from server_app import app as server_app
from server_app import launch
from strategies import registry
from strategies.wrapper import ServerStages
from tests.helpers import ClientAppGrid

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"num-clients": 4, "projection-dim": 32, "eval-batch-size": 1000, "image-size": 8}  # digits are 8x8


def config(tmp_path, **overrides):
    raw = {**SMALL, "align": True, "output-dir": str(tmp_path), **overrides}
    return validate(raw, choices={"strategy": registry.STRATEGIES})


def context(cfg, run_id="t"):
    data = server_data(cfg)
    classes = data.dataset.num_classes

    def new_model(seed=None):
        return build_model("resnet8", int(cfg["projection-dim"]), classes, seed=seed)

    def evaluate(arrays):
        preds, labels = predict(load_record(new_model(), arrays), data.test)
        return summarize(preds, labels, classes, data.groups)

    return ServerContext(cfg, data, new_model, evaluate)


def settings(beta, steps=8, loss="ce+kl", lr=0.05):
    return AlignSettings(steps, lr, 32, beta, 3.0, loss, "every-round", True)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_beta_zero_is_plain_ce_fine_tuning_and_alignment_changes_weights(tmp_path):
    cfg = config(tmp_path)
    data = server_data(cfg)
    q = torch.randn(len(data.align), 10) * 5
    start = state(build_model("resnet8", 32, 10, seed=1))

    def tuned(beta):
        model = build_model("resnet8", 32, 10)
        model.load_state_dict(start)
        fine_tune(model, data.align, data.dataset, 8, q, settings(beta), torch.Generator().manual_seed(3))
        return state(model)

    ce_only, with_kl = tuned(0.0), tuned(1.0)
    plain = build_model("resnet8", 32, 10)
    plain.load_state_dict(start)
    batches = Batches(data.align, data.dataset, 8, 32)
    assert len(batches) == 4  # 8 steps = 2 epochs over the 100 images of D_align
    train(plain, batches, TrainSettings(2, 0.05, 0.0, 0.0, True), torch.Generator().manual_seed(3))
    assert all(torch.equal(ce_only[k], v) for k, v in plain.state_dict().items())
    changed = [k for k in start if start[k].is_floating_point() and not torch.equal(start[k], ce_only[k])]
    assert "classifier.weight" in changed and len(changed) > 10
    assert not torch.allclose(with_kl["classifier.weight"], ce_only["classifier.weight"])


def test_kl_term_pulls_the_student_towards_the_teacher(tmp_path):
    cfg = config(tmp_path)
    data = server_data(cfg)
    q = torch.nn.functional.one_hot(torch.from_numpy((data.align.labels + 3) % 10), 10).float() * 8
    everything = Batches(data.align, data.dataset, 8, len(data.align))

    @torch.no_grad()
    def kl_to_teacher(model):
        x, _ = next(everything.iterate())
        log_p = torch.log_softmax(model(x) / 3, 1)
        return torch.nn.functional.kl_div(log_p, torch.log_softmax(q / 3, 1), reduction="batchmean", log_target=True)

    def tuned(loss):
        model = build_model("resnet8", 32, 10, seed=1)
        stats = fine_tune(
            model, data.align, data.dataset, 8, q, settings(1.0, 10, loss, lr=0.2), torch.Generator().manual_seed(0)
        )
        return model, stats

    before = kl_to_teacher(build_model("resnet8", 32, 10, seed=1))
    (kl_model, kl_stats), (ce_model, ce_stats) = tuned("kl"), tuned("ce")
    assert kl_stats["align-ce"] == 0.0 and kl_stats["align-kl"] > 0 and ce_stats["align-kl"] == 0.0
    assert kl_to_teacher(kl_model) < before < kl_to_teacher(ce_model)  # q disagrees with y here


def test_teacher_runs_once_for_d_align_across_rounds_and_reruns(tmp_path, teacher_calls):
    calls = teacher_calls
    cfg = config(tmp_path, **{"num-server-rounds": 3, "eval-every": 5, "align-eval-every": 5, "align-steps": 1})
    ctx = context(cfg)
    (stage,) = alignment_stages(cfg, ctx).after_aggregation
    align_size = len(ctx.data.align)
    arrays = to_record(ctx.new_model(seed=0))
    rows, outcomes = [], []
    for rnd in (1, 2, 3):
        metrics = MetricRecord()
        outcomes.append(stage(rnd, arrays, metrics))
        new = outcomes[-1].arrays
        assert not np.array_equal(new["classifier.weight"].numpy(), arrays["classifier.weight"].numpy())
        arrays = new
        rows.append(metrics)
    assert calls.count(align_size) == 1 and len(calls) == 2  # D_align once, the test split once
    assert "pre-align-accuracy" not in rows[0] and "pre-align-few-accuracy" in rows[2]  # the last round only
    assert rows[0]["align-steps"] == 1 and rows[0]["align-kl"] == 0.0
    assert not outcomes[0].sections and not outcomes[0].figures  # the step's figure comes with the last round only
    report = RunReport(tmp_path / "report", 3, ctx.data.dataset.classes)
    report.dir.mkdir()
    report.take(outcomes[-1])
    info = json.loads((report.dir / "alignment.json").read_text())
    assert info["teacher-random-weights"] is True and info["beta-effective"] == 0.0 and "random" in info["beta-note"]
    assert 0.0 <= info["teacher-test-accuracy"] <= 0.3  # a random teacher is near chance (0.1), and visible
    assert set(info["alignment-step"]) == {"round", "before", "after"}
    assert (report.dir / "alignment-step.png").is_file() and report.sections["alignment"] == info
    alignment_stages(cfg, context(cfg, run_id="rerun"))  # a rerun with the same D_align hits the disk cache
    assert len(calls) == 2


def test_alignment_raises_few_class_accuracy_on_the_long_tailed_default(tmp_path):
    cfg = config(tmp_path, **{"num-server-rounds": 1, "align-steps": 24, "align-lr": 0.05})
    ctx = context(cfg)
    prep = prepare(cfg)
    assert ctx.data.groups["few"], "the default long tail has few-shot classes"
    model = ctx.new_model(seed=7)
    pool = Batches(prep.dataset.train.subset(prep.split.pool), prep.dataset, 8, 32)
    train(model, pool, TrainSettings(1, 0.1, 0.0, 0.0, True), torch.Generator().manual_seed(7))
    (stage,) = alignment_stages(cfg, ctx).after_aggregation
    step = stage(1, to_record(model), MetricRecord()).sections["alignment"]["alignment-step"]
    before, after = step["before"], step["after"]
    print(f"few-class accuracy before {before['few-accuracy']:.3f} -> after {after['few-accuracy']:.3f} (beta 0)")
    assert after["few-accuracy"] > before["few-accuracy"]


@pytest.mark.parametrize(
    ("overrides", "hint"),
    [
        ({"align-beta": -0.5}, "'align-beta' = -0.5"),
        ({"align-temperature": 0.0}, "'align-temperature'"),
        ({"align-loss": "mse"}, "ce+kl, ce, kl"),
        ({"align-when": "sometimes"}, "every-round, last-round"),
        ({"align-logits-file": "/no/such/q.npy"}, "not an existing file"),
    ],
)
def test_bad_alignment_config_is_rejected(tmp_path, overrides, hint):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, **overrides)
    assert hint in str(err.value)


def test_bad_teacher_inputs_fail_before_round_one(tmp_path, monkeypatch):
    cfg = config(tmp_path, **{"align-teacher": "ViT-L-14-336"})
    with pytest.raises(ConfigError, match="projection-dim.*embedding size 768"):
        alignment_stages(cfg, context(cfg))
    cfg = config(tmp_path, **{"align-teacher": "NoSuchCLIP"})
    with pytest.raises(ConfigError, match="'align-teacher' = 'NoSuchCLIP'"):
        alignment_stages(cfg, context(cfg))
    cfg = config(tmp_path, **{"align-teacher": "ViT-L-14-336", "projection-dim": 768})
    monkeypatch.setattr(clip_teacher, "_cached_weights", lambda name, tag: None)  # as on a machine without them
    with pytest.raises(WeightsNotFound, match="ViT-L-14-336 / openai.*align-logits-file"):
        alignment_stages(cfg, context(cfg))
    with pytest.raises(ConfigError, match="class names are missing"):
        check_class_names(["class 0", "class 1", "class 2"])
    cfg = config(tmp_path, **{"align-loss": "kl"})
    with pytest.raises(ConfigError, match="'align-loss' = 'kl'.*random"):
        alignment_stages(cfg, context(cfg))


def test_launcher_stops_bad_alignment_input_before_starting_anything(no_superlink, capsys):
    assert launch.main(["--run-config", "align=true align-teacher=ViT-B-32 projection-dim=768"]) == 2
    assert "embedding size 512" in capsys.readouterr().err
    assert launch.main(["--run-config", "align=true align-beta=-1.0"]) == 2
    assert "'align-beta' = -1.0" in capsys.readouterr().err


def test_logits_file_is_checked_and_used_with_its_beta(tmp_path):
    cfg = config(tmp_path)
    data = server_data(cfg)
    n, classes = len(data.align), list(data.dataset.classes)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((n, 9), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"shape \(100, 9\): expected \(100, 10\)"):
        alignment_stages(config(tmp_path, **{"align-logits-file": str(wrong)}), context(cfg))
    renamed = tmp_path / "renamed.pt"
    torch.save({"logits": torch.zeros(n, 10), "classes": classes[::-1]}, renamed)
    with pytest.raises(ConfigError, match="do not match"):
        alignment_stages(config(tmp_path, **{"align-logits-file": str(renamed)}), context(cfg))
    good = tmp_path / "q.pt"
    one_hot = torch.nn.functional.one_hot(torch.from_numpy(data.align.labels), 10).float() * 10
    test_logits = torch.nn.functional.one_hot(torch.from_numpy(data.dataset.test.labels), 10).float()
    torch.save({"logits": one_hot, "classes": classes, "test-logits": test_logits}, good)
    cfg = config(tmp_path, **{"align-logits-file": str(good), "align-beta": 0.5, "align-steps": 2})
    ctx = context(cfg)
    stages = alignment_stages(cfg, ctx)
    metrics = MetricRecord()
    stages.after_aggregation[0](1, to_record(ctx.new_model(seed=0)), metrics)
    info = stages.sections["alignment"]
    assert info["beta-effective"] == 0.5 and info["teacher-test-accuracy"] == 1
    assert metrics["align-kl"] > 0 and metrics["align-ce"] > 0


def test_alignment_off_adds_no_stage(tmp_path):
    cfg = config(tmp_path, align=False)
    assert alignment_stages(cfg, ctx=None).after_aggregation == []
    assert validate({})["align"] is False  # the foundation's default run is unchanged


@pytest.mark.usefixtures("flower_identity")
def test_fedprox_with_alignment_runs_through_the_server_app(tmp_path, monkeypatch):
    def fedprox(cfg):
        return FedProx(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, proximal_mu=0.01)

    monkeypatch.setitem(registry.STRATEGIES, "fedprox", fedprox)
    overrides = {"strategy": "fedprox", "num-clients": 2, "num-server-rounds": 2, "local-epochs": 1}
    cfg = config(tmp_path, **overrides, **{"dirichlet-alpha": 100.0, "align-steps": 1, "align-eval-every": 1})
    grid = ClientAppGrid(cfg)
    built = registry.build_server_strategy(cfg, context(cfg), RunReport(tmp_path, 2, []))
    assert isinstance(built.strategy, ServerStages) and isinstance(built.method, FedProx)
    summary = server_app.run(grid, cfg, "fedprox")
    assert all(c["proximal-mu"] == 0.01 for c in grid.configs) and len(grid.configs) == 4
    rows = read_metrics(tmp_path / "fedprox")
    assert all("pre-align-accuracy" in r and r["align-steps"] == 1 for r in rows[1:])
    assert summary["alignment"]["alignment-step"]["round"] == 2
    assert (tmp_path / "fedprox" / "alignment-step.png").is_file()


CLIENT_SCRIPT = """
import json, sys
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
for name in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, name, 1)
from client_app.app import train_fn
from flcore.config import validate
from flcore.models import run_model
cfg = validate(json.loads(sys.argv[1]))
model = run_model(cfg, 10, seed=0)
msg = Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({"server-round": 1})}),
              dst_node_id=1, message_type="train")
ctx = Context(1, 1, {"partition-id": 0, "num-partitions": cfg["num-clients"]}, RecordDict(), dict(cfg))
reply = train_fn(msg, ctx)
print(json.dumps({
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("open_clip", "transformers", "strategies")),
    "records": sorted(reply.content.keys()),
    "arrays": sorted(reply.content["arrays"].keys()),
    "model": sorted(model.state_dict().keys()),
    "metrics": {k: type(v).__name__ for k, v in reply.content["metrics"].items()},
}))
"""


@pytest.mark.slow
def test_client_never_imports_clip_and_replies_only_arrays_and_scalars(tmp_path):
    cfg = {**SMALL, "align": True, "align-teacher": "ViT-L-14-336", "output-dir": str(tmp_path), "local-epochs": 1}
    out = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, json.dumps(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []  # no open_clip, no transformers, not even the server's strategies package
    assert got["records"] == ["arrays", "metrics"]
    assert got["arrays"] == got["model"]  # exactly the model's weights: no gradients, no features
    assert got["metrics"] and set(got["metrics"].values()) <= {"int", "float"}


@pytest.mark.slow
def test_full_simulation_with_alignment_through_flwr_run(tmp_path, capfd):
    """The one full run of this issue: `flwr run` on a local SuperLink, FedAvg + alignment, tiny teacher."""
    overrides = (
        "num-clients=3 num-server-rounds=2 fraction-train=1.0 local-epochs=1 dirichlet-alpha=100.0 image-size=8 "
        f"projection-dim=32 align=true align-steps=2 align-eval-every=1 output-dir={tmp_path}"
    )
    assert launch.main(["--run-config", overrides]) == 0
    out = capfd.readouterr().out  # the ServerApp's log comes from the SuperLink's processes
    assert "finished:completed" in out and "RANDOM weights" in out
    run_dir = next(p for p in tmp_path.iterdir() if (p / "metrics.jsonl").is_file())
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["replies"] == 3 and r["align-steps"] == 2 and "pre-align-few-accuracy" in r for r in rows[1:])
    summary = read_summary(run_dir)
    assert summary["alignment"]["beta-effective"] == 0.0 and summary["alignment"]["teacher-random-weights"]
    assert summary["alignment"]["alignment-step"]["after"]["accuracy"] == summary["final"]["accuracy"]
    assert (run_dir / "alignment-step.png").is_file() and len(list((tmp_path / "teacher-cache").glob("*.pt"))) == 2


def test_stage_reuses_one_model_and_evaluates_before_alignment_only_where_asked(tmp_path):
    """The stage's cost is its arithmetic: no model is rebuilt per round, and the extra test-set pass runs
    only on `align-eval-every` rounds and the last (evaluating every round doubled the stage's cost)."""
    cfg = config(tmp_path, **{"num-server-rounds": 5, "align-eval-every": 2, "align-steps": 1})
    ctx = context(cfg)
    built, evaluated = [], []
    new_model, evaluate = ctx.new_model, ctx.evaluate
    ctx.new_model = lambda seed=None: built.append(seed) or new_model(seed)
    ctx.evaluate = lambda arrays: evaluated.append(arrays) or evaluate(arrays)
    (stage,) = alignment_stages(cfg, ctx).after_aggregation
    arrays = to_record(new_model(seed=0))
    rows = []
    for rnd in range(1, 6):
        rows.append(MetricRecord())
        arrays = stage(rnd, arrays, rows[-1]).arrays
    assert len(built) == 1  # built with the stage, refilled every round
    assert ["pre-align-accuracy" in r for r in rows] == [False, True, False, True, True]
    assert len(evaluated) == 4  # rounds 2 and 4 before alignment; round 5 before and after its step
    assert all(r["align-steps"] == 1 for r in rows)


@pytest.mark.usefixtures("flower_identity")
def test_a_round_reports_where_its_time_went_and_the_last_model_is_evaluated_once(tmp_path, monkeypatch):
    passes = []
    real_predict = server_app.predict
    monkeypatch.setattr(
        server_app, "predict", lambda model, batches, compute: passes.append(1) or real_predict(model, batches, compute)
    )
    overrides = {"num-clients": 2, "fraction-train": 1.0, "num-server-rounds": 2, "local-epochs": 1}
    cfg = config(tmp_path, **overrides, **{"dirichlet-alpha": 100.0, "align-steps": 1, "align-eval-every": 0})
    server_app.run(ClientAppGrid(cfg), cfg, "timed")
    rows = read_metrics(tmp_path / "timed")
    # rounds 0, 1 and 2 once each, plus round 2's model before its alignment step; the aligned model that
    # the step's figure needs is the one Flower's evaluation scores next, so it is not scored twice
    assert len(passes) == 4
    assert "pre-align-accuracy" not in rows[1] and "pre-align-accuracy" in rows[2]
    for row in rows[1:]:
        parts = row["train-wait-seconds"] + row["aggregate-seconds"] + row["stage-seconds"]
        assert 0 < parts <= row["seconds"] and row["stage-seconds"] >= row["align-seconds"] > 0
        assert 0 < row["train-seconds"] < row["train-wait-seconds"] and row["train-images-per-second"] > 0


@pytest.mark.usefixtures("flower_identity")
def test_the_server_runs_on_server_threads_and_gives_the_process_its_threads_back(tmp_path, monkeypatch):
    seen = []
    real_predict = server_app.predict
    monkeypatch.setattr(
        server_app, "predict", lambda m, b, c: seen.append(torch.get_num_threads()) or real_predict(m, b, c)
    )
    overrides = {"num-clients": 2, "fraction-train": 1.0, "num-server-rounds": 1, "local-epochs": 1}
    torch.set_num_threads(2)  # as torch's default on a 2-core machine; the one_thread fixture restores it
    for threads, expected in ((1, 1), (0, 2)):
        cfg = config(tmp_path / str(threads), **overrides, **{"align-steps": 1, "server-threads": threads})
        server_app.run(ClientAppGrid(cfg), cfg, "threads")
        assert set(seen) == {expected} and torch.get_num_threads() == 2
        seen.clear()
