"""Stage 1 (pretrain/) with the tiny random teacher: nothing is downloaded, every model here is random."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flcore.arrays import to_record
from flcore.config import ConfigError, WeightsNotFound, validate
from flcore.models import build_model
from flcore.reports import RunReport
from flcore.server_data import server_data
from pretrain.annotate import annotate, done_ids
from pretrain.checkpoints import Checkpoints
from pretrain.dwp import DWPConfig, alpha_at, build_gfl, clip_features, lm_loss, mixed_features, train_dwp
from pretrain.llava_data import AnnotationError, LlavaSamples, load_annotations
from pretrain.stage import digits_images, dwp_settings, held_out_digits, pretrain_stage, render_digit
from pretrain.teacher import TINY_NOTE, load_teacher, projector, tiny_teacher, vision_tower
from rounds.stage import ServerContext
from strategies.registry import STRATEGIES, build_stages
from tests.helpers import one_torch_thread, validated


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The module's fixtures build models before each test's own one thread: they get one too."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def records(teacher, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "ann.jsonl"
    annotate(teacher, images, out, max_new_tokens=6)
    return load_annotations(out)


def samples(teacher, records, images):
    return LlavaSamples(records, images, teacher, 16, (0.5,) * 3, (0.5,) * 3)


def new_gfl(teacher, seed=0):
    return build_gfl(build_model("resnet8", 16, 10, seed=seed), teacher)


def test_alpha_is_a_cosine_ramp_over_the_first_half_then_one():
    assert alpha_at(0, 100) == 0.0
    assert alpha_at(25, 100) == pytest.approx(0.5)
    assert alpha_at(10, 100) == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))
    assert alpha_at(49, 100) < 1.0
    assert alpha_at(50, 100) == alpha_at(99, 100) == 1.0


def test_gfl_tokens_have_clip_feature_shape(teacher, records, images):
    batch = samples(teacher, records, images).batch([0, 1], need_clip=True)
    g = clip_features(teacher, batch.clip_pixels)
    z = new_gfl(teacher)(batch.fl_pixels)
    assert g.shape == z.shape == (2, teacher.grid**2, teacher.vision_hidden) == (2, 16, 32)
    with torch.no_grad():  # g is exactly what LLaVA itself feeds its projector
        own = teacher.model.get_image_features(
            pixel_values=batch.clip_pixels,
            vision_feature_layer=teacher.config.vision_feature_layer,
            vision_feature_select_strategy=teacher.config.vision_feature_select_strategy,
        ).pooler_output
        assert torch.allclose(torch.stack(list(own)), projector(teacher)(g), atol=1e-6)


def test_only_gfl_trains_and_every_frozen_parameter_is_bit_identical(teacher, records, images):
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    gfl = new_gfl(teacher)
    start = {k: v.clone() for k, v in gfl.state_dict().items()}
    result = train_dwp(teacher, gfl, samples(teacher, records, images), DWPConfig(epochs=2, batch_size=4, lr=1e-2))
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    changed = [k for k, v in gfl.state_dict().items() if not torch.equal(start[k], v)]
    assert any(k.startswith("backbone.") for k in changed) and any(k.startswith("projection.") for k in changed)
    assert result.steps == 2 * math.ceil(len(records) / 4) and len(result.epoch_loss) == 2


def test_lm_loss_falls_when_overfitting_a_handful_of_samples(teacher, records, images):
    batch = samples(teacher, records, images).batch([0, 1, 2, 3], need_clip=False)
    assert (batch.labels != -100).sum() < (batch.labels == -100).sum()  # loss only on answers
    gfl = new_gfl(teacher)
    opt = torch.optim.AdamW(gfl.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = lm_loss(teacher, mixed_features(teacher, gfl, batch, alpha=1.0), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_clip_forward_is_skipped_once_alpha_is_one(teacher, records, images):
    calls = []
    handle = vision_tower(teacher).register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        data = samples(teacher, records, images)
        gfl = new_gfl(teacher)
        mixed_features(teacher, gfl, data.batch([0], need_clip=True), alpha=0.5)
        assert len(calls) == 1
        no_clip = data.batch([0], need_clip=False)
        assert no_clip.clip_pixels is None
        mixed_features(teacher, gfl, no_clip, alpha=1.0)
        assert len(calls) == 1
        calls.clear()
        result = train_dwp(teacher, gfl, data, DWPConfig(epochs=4, batch_size=4))
    finally:
        handle.remove()
    ramp = sum(alpha_at(s, result.steps) < 1 for s in range(result.steps))
    assert len(calls) == result.clip_calls == ramp == result.steps // 2


def test_resume_from_epoch_checkpoint_reproduces_an_uninterrupted_run(teacher, records, images, tmp_path):
    cfg = DWPConfig(epochs=2, batch_size=4, lr=1e-2)
    full = new_gfl(teacher)
    train_dwp(teacher, full, samples(teacher, records, images), cfg, Checkpoints(tmp_path / "a"))
    ckpt = Checkpoints(tmp_path / "b")
    train_dwp(teacher, new_gfl(teacher), samples(teacher, records, images), cfg, ckpt)
    (ckpt.root / "epoch-002.pt").unlink()  # "crash" after epoch 1
    resumed = new_gfl(teacher, seed=5)
    result = train_dwp(teacher, resumed, samples(teacher, records, images), cfg, ckpt)
    assert result.resumed_from == 1 and len(result.epoch_loss) == 2
    ref = full.state_dict()
    assert all(torch.allclose(ref[k].float(), v.float()) for k, v in resumed.state_dict().items())


def test_annotation_resume_skips_done_images_and_keeps_earlier_output(teacher, tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(root / f"{i}.png")
    out = tmp_path / "ann.jsonl"
    first = annotate(teacher, root, out, images=["0.png", "1.png"], max_new_tokens=4)
    assert first.written == 6 and first.annotator == TINY_NOTE
    earlier = out.read_bytes()
    with out.open("ab") as f:
        f.write(b'{"id": "torn')  # an interrupted write
    second = annotate(teacher, root, out, max_new_tokens=4)
    assert second.skipped_done == 6 and second.written == 3
    assert out.read_bytes().startswith(earlier)
    assert len(done_ids(out)) == 9
    records = load_annotations(out)
    assert {r.image for r in records} == {"0.png", "1.png", "2.png"}
    assert all(r.conversations[0][1].startswith("<image>\n") for r in records)


def test_broken_image_is_logged_skipped_and_counted(teacher, tmp_path, caplog):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (12, 12)).save(root / "good.png")
    (root / "bad.png").write_bytes(b"not an image")
    summary = annotate(teacher, root, tmp_path / "a.jsonl", max_new_tokens=4)
    assert summary.failed == ["bad.png"] and summary.as_dict()["failed_count"] == 1 and summary.written == 3
    assert "bad.png" in caplog.text
    records = load_annotations(tmp_path / "a.jsonl")
    broken = [r.__class__(r.id + "-x", "bad.png", r.conversations) for r in records[:1]]
    data = samples(teacher, records + broken, root)
    result = train_dwp(teacher, new_gfl(teacher), data, DWPConfig(epochs=1, batch_size=2))
    assert result.failed_images == 1 and result.steps == 2


def test_malformed_annotation_file_names_the_line(tmp_path):
    good = {
        "id": "a",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "x"}],
    }
    lines = tmp_path / "bad.jsonl"
    lines.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n{broken\n")
    with pytest.raises(AnnotationError, match=r"bad\.jsonl:3: invalid JSON"):
        load_annotations(lines)
    array = tmp_path / "chat.json"
    bad = {"id": "b", "image": "b.png"}
    array.write_text("[\n" + json.dumps(good) + ",\n" + json.dumps(good) + ",\n" + json.dumps(bad) + "\n]\n")
    with pytest.raises(AnnotationError, match=r"chat\.json:4: record lacks 'conversations'"):
        load_annotations(array)
    array.write_text(json.dumps([good, good], indent=1))
    assert len(load_annotations(array)) == 2


def test_missing_teacher_names_the_model_and_how_to_get_it(tmp_path):
    with pytest.raises(WeightsNotFound, match=r"'no-such-org/llava'.*huggingface-cli download no-such-org/llava"):
        load_teacher("no-such-org/llava")


def test_config_rejects_bad_pretrain_values(tmp_path):
    choices = {"strategy": STRATEGIES}
    with pytest.raises(ConfigError, match="pretrain-grad-accum"):
        validate({"pretrain-batch-size": 128, "pretrain-grad-accum": 3}, choices=choices)
    with pytest.raises(ConfigError, match="pretrain-data"):
        validate({"pretrain": True, "pretrain-data": str(tmp_path / "missing.json")}, choices=choices)


STAGE_RUN = {
    "pretrain": True,
    "pretrain-max-samples": 3,
    "pretrain-max-new-tokens": 4,
    "pretrain-epochs": 2,
    "pretrain-batch-size": 4,
    "pretrain-grad-accum": 2,
    "num-clients": 4,
}


def test_stage_hands_the_pretrained_backbone_to_round_one_and_reuses_the_cache(tmp_path):
    cfg = validated({**STAGE_RUN, "pretrain-cache-dir": str(tmp_path / "cache")})
    data = server_data(cfg)
    ctx = ServerContext(cfg, data, None, None)
    assert pretrain_stage(cfg.with_(pretrain=False), ctx).before_training == []
    hooks = build_stages(cfg, ctx).before_training  # registered in SERVER_STAGES, no app special case
    assert len(hooks) == 1
    hook = hooks[0]
    initial = to_record(build_model("resnet8", 512, 10, seed=7))
    outcome = hook(initial)
    out, meta = outcome.arrays.to_torch_state_dict(), outcome.sections["pretrain"]
    assert meta["note"] == TINY_NOTE and meta["reused"] is False and meta["annotation"]["written"] == 9
    assert meta["handed-over"] == ["backbone"] and "differs from LLaVA's vision width 32" in meta["handover-note"]
    cached = torch.load(Path(meta["cache"]) / "final.pt", weights_only=False)["gfl"]
    init = initial.to_torch_state_dict()
    for key, value in out.items():
        if key.startswith("backbone."):
            assert torch.equal(value, cached[key].to(value.dtype))
        else:
            assert torch.equal(value, init[key])  # projection-dim 512 is not the tiny LLaVA's 32: projection fresh
    assert not torch.equal(out["backbone.stem.0.weight"], init["backbone.stem.0.weight"])
    second = hook(initial)
    again = second.arrays.to_torch_state_dict()
    assert second.sections["pretrain"]["reused"] is True
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_digits_stand_in_holds_no_test_or_d_align_image(tmp_path):
    """The offline web-image stand-in leaves out every digit the run evaluates (test split) or aligns on."""
    cfg = validated({"pretrain": True, "image-size": 8, "align-per-class": 10})
    data = server_data(cfg)  # at image-size 8 the images are the scans themselves
    held = [data.dataset.test.images[i, 0].numpy() for i in range(len(data.dataset.test))]
    held += [data.align.images[i, 0].numpy() for i in range(len(data.align))]
    rendered = {np.asarray(render_digit(scan)).tobytes() for scan in held}
    folder = digits_images(tmp_path, held_out_digits(cfg))
    written = [np.asarray(Image.open(f).convert("RGB")).tobytes() for f in sorted(folder.glob("*.png"))]
    assert len(written) == 1797 - len(data.dataset.test) - len(data.align) == 1158
    assert not rendered & set(written)
    other = validated({**cfg, "dataset": "folder", "data-dir": str(tmp_path)})
    assert len(held_out_digits(other)) == 539  # another dataset's D_align is not a digit: only the test split


def test_gfl_trains_the_fl_models_own_projection_when_it_has_llavas_width(teacher, records, images):
    assert teacher.vision_hidden == 32
    matching, other = build_model("resnet8", 32, 10, seed=0), build_model("resnet8", 16, 10, seed=0)
    gfl, separate = build_gfl(matching, teacher), build_gfl(other, teacher)
    assert gfl.projection is matching.projection and separate.projection is not other.projection
    before = {k: v.clone() for k, v in matching.projection.state_dict().items()}
    untouched = {k: v.clone() for k, v in other.projection.state_dict().items()}
    data = samples(teacher, records, images)
    train_dwp(teacher, gfl, data, DWPConfig(epochs=1, batch_size=4, lr=1e-2))
    train_dwp(teacher, separate, data, DWPConfig(epochs=1, batch_size=4, lr=1e-2))
    assert all(not torch.equal(before[k], v) for k, v in matching.projection.state_dict().items())
    assert all(torch.equal(untouched[k], v) for k, v in other.projection.state_dict().items())
    assert set(gfl.state_dict()) <= set(matching.state_dict())  # g_fl's keys are the FL model's


def test_with_matching_widths_round_one_gets_the_dwp_trained_projection_too(tmp_path):
    cfg = validated(
        {**STAGE_RUN, "pretrain-cache-dir": str(tmp_path / "cache"), "projection-dim": 32},
    )
    ctx = ServerContext(cfg, server_data(cfg), None, None)
    (hook,) = build_stages(cfg, ctx).before_training
    initial = to_record(build_model("resnet8", 32, 10, seed=7))
    outcome = hook(initial)
    out, meta = outcome.arrays.to_torch_state_dict(), outcome.sections["pretrain"]
    assert meta["handed-over"] == ["backbone", "projection"] and "equals LLaVA's vision width" in meta["handover-note"]
    cached = torch.load(Path(meta["cache"]) / "final.pt", weights_only=False)["gfl"]
    init = initial.to_torch_state_dict()
    projection = [k for k in out if k.startswith("projection.")]
    assert projection and all(torch.equal(out[k], cached[k].to(out[k].dtype)) for k in projection)
    assert all(not torch.equal(out[k], init[k]) for k in projection)
    assert all(torch.equal(out[k], init[k]) for k in out if k.startswith("classifier."))
    report = RunReport(tmp_path / "run", 1, [])
    report.dir.mkdir()
    report.take(outcome)
    assert json.loads((report.dir / "pretrain.json").read_text())["handed-over"] == ["backbone", "projection"]
    other = validated({**cfg, "projection-dim": 512})  # what DWP trains changes
    (narrow,) = build_stages(other, ServerContext(other, ctx.data, None, None)).before_training
    second = narrow(to_record(build_model("resnet8", 512, 10, seed=7))).sections["pretrain"]
    assert second["reused"] is False and second["cache"] != meta["cache"] and second["handed-over"] == ["backbone"]
    assert hook(initial).sections["pretrain"]["reused"] is True


def test_gradient_checkpointing_gives_the_same_training_and_accumulation_the_same_steps(teacher, records, images):
    plain, ckpt, accum = new_gfl(teacher), new_gfl(teacher), new_gfl(teacher)
    data = samples(teacher, records, images)
    base = train_dwp(teacher, plain, data, DWPConfig(epochs=1, batch_size=4, lr=1e-2))
    train_dwp(teacher, ckpt, data, DWPConfig(epochs=1, batch_size=4, lr=1e-2, gradient_checkpointing=True))
    assert not teacher.model.training
    ref = plain.state_dict()
    assert all(torch.allclose(ref[k], v, atol=1e-5) for k, v in ckpt.named_parameters())
    split = train_dwp(teacher, accum, data, DWPConfig(epochs=1, batch_size=4, grad_accum=2, lr=1e-2))
    assert split.steps == base.steps == math.ceil(len(records) / 4)


def test_launcher_stops_a_missing_llava_before_starting_anything(no_superlink, capsys):
    """The preflight runs every stage's checks: stage 1's missing teacher stops before the SuperLink starts."""
    from server_app import launch

    assert launch.main(["--run-config", "pretrain=true pretrain-teacher=no-such-org/llava"]) == 2
    assert "huggingface-cli download no-such-org/llava" in capsys.readouterr().err


def test_the_dwp_cache_key_tells_mixed_precision_from_float32_and_keeps_float32s_old_key():
    cfg = validate({"pretrain": True})
    off = dwp_settings(cfg)
    assert "amp" not in off  # the key float32 runs had before `amp` existed: their caches stay valid
    assert dwp_settings(cfg.with_(amp="bf16")) == {**off, "amp": "bf16"}
    assert dwp_settings(cfg.with_(device="cuda")) == off
    assert dwp_settings(cfg.with_(head="mlp")) == off  # the paper's MLP (auto with pretrain on) keeps its key


def test_a_model_without_a_projection_takes_only_the_pretrained_backbone():
    from pretrain.stage import handover

    cfg = validate({"pretrain": True, "head": "none"})
    assert dwp_settings(cfg)["head"] == "none"  # no FL projection: the separate MLP is what DWP trains
    parts = handover(False, 32, int(cfg["projection-dim"]), "none")
    assert parts["handed-over"] == ["backbone"] and "head=none" in parts["handover-note"]
