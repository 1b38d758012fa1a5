"""The baselines that change what clients send or what the server does, one tiny round each through `flwr run`.

Tiny random-weight ResNet-8 runs on digits at 8 px (2 clients, 1 round): CCVR with focal loss and
tau-norm in one run, CReFF in another. fedprox/fedavgm/fednova change no payload; they are covered
in-process (tests/test_baselines.py) and run through the apps in `python -m bench.compare --quick`.
"""

import pytest

from flcore.reports import read_metrics, read_summary
from tests.helpers import TINY, launch_run

ONE_ROUND = {**TINY, "num-clients": 2, "num-server-rounds": 1, "fraction-train": 1.0}
CALIBRATION = {"calibration-epochs": 2, "match-epochs": 2, "virtual-per-class": 4}


def run_one(tmp_path, name: str, **overrides) -> tuple[dict, dict]:
    run_dir = launch_run(tmp_path / name, {**ONE_ROUND, **CALIBRATION, **overrides})
    return read_metrics(run_dir)[-1], read_summary(run_dir)


@pytest.mark.slow
def test_baselines_run_one_round_through_the_real_apps(tmp_path):
    from flcore.models import build_model

    # CCVR and CReFF train their reference model: ResNet-8 -> Linear(256, C), features of width D = 256
    model_bytes = sum(
        v.numel() * v.element_size() for v in build_model("resnet8", 32, 10, head="none").state_dict().values()
    )
    dim = 256

    row, summary = run_one(tmp_path, "ccvr", strategy="ccvr", loss="focal", **{"tau-norm": 1.0})
    assert row["round"] == 1 and row["replies"] == 2
    assert row["calibrated-classes"] == 10 and row["tau-norm"] == 1.0
    assert row["feature-stats-replies"] == 2 and row["feature-stats-failed"] == 0
    assert row["feature-stats-bytes"] > 10 * dim * dim * 4  # per-class DxD float32 covariances, sent after training
    assert (
        model_bytes < row["upload-bytes"] < model_bytes + 10 * dim * dim * 4
    )  # the train replies carry the model only
    assert "covariance" in summary["client-uploads"] and "focal" in summary["client-runs"]
    assert row["peak-rss-mb"] > 0

    row, summary = run_one(tmp_path, "creff", strategy="creff")
    assert row["match-loss"] >= 0 and row["upload-bytes"] > model_bytes + 10 * 10 * dim * 4
    assert "gradients" in summary["client-uploads"]
