"""A ClientApp whose process dies mid-round (Ray's OOM killer ending a `ClientAppActor`) is one failed reply:
the round goes on with the others and the report counts it. One real simulation, 3 rounds of 4 clients,
where partition 3's process ends with `os._exit` in round 1 (`fail-mode=exit`; seed 21 and fail-rate 0.1
fail exactly that one, `client_app.faults.fails`)."""

import pytest

from client_app.faults import fails
from flcore.reports import read_metrics
from server_app import launch

SEED, RATE = 21, 0.1


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("actor-death")
    overrides = (
        "num-server-rounds=3 local-epochs=1 num-clients=4 fraction-train=1.0 image-size=8 "
        f"seed={SEED} fail-rate={RATE} fail-mode='exit' output-dir='{out}'"
    )
    # 1 CPU per client: 2 actors on 2 cores (the default's 2 CPUs give one, and a dead one would be the only one)
    assert launch.main(["--run-config", overrides, "--federation-config", "client-resources-num-cpus=1"]) == 0
    (run_dir,) = list(out.iterdir())
    return read_metrics(run_dir)


def test_the_seed_kills_one_client_in_round_1_only():
    assert [[p for p in range(4) if fails(SEED, rnd, p, RATE)] for rnd in (1, 2, 3)] == [[3], [], []]


@pytest.mark.slow
def test_a_client_process_that_dies_is_a_failed_reply_and_the_run_goes_on(rows):
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["failed"] >= 1 and rows[1]["replies"] >= 1
    assert all(r["replies"] >= 1 and r["replies"] + r["failed"] == 4 for r in rows[1:])


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="Flower 1.42 keeps the dead actor: RayBackend.process_message puts it back in the pool "
    "(BasicActorPool.add_actor_back_to_pool) and ClientAppActor has no max_restarts, so every later message "
    "it is handed fails at once (measured: 1 reply, 3 failed in each of rounds 1-3 with 2 actors)",
)
def test_the_dead_actor_is_replaced_so_later_rounds_get_every_reply(rows):
    assert [r["replies"] for r in rows[2:]] == [4, 4]
