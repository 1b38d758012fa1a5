"""A ClientApp whose process dies mid-round (Ray's OOM killer ending a `ClientAppActor`) is one failed reply:
the round goes on with the others, the report counts it, and fresh actors take the remaining rounds
(`rounds.restarts`: the run ends after that round and the launcher resumes it). One real simulation, 3 rounds
of 4 clients, where partition 3's process ends with `os._exit` in round 1 (`fail-mode=exit`; seed 21 and
fail-rate 0.1 fail exactly that one, `client_app.faults.fails`); the fast tests check the detection and the
bounded restart decision without a Flower run."""

import json
import sys
import types

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from client_app.faults import fails
from flcore.config import ConfigError
from flcore.reports import METRICS, SUMMARY, read_metrics, read_summary
from rounds.policy import RoundPolicy
from rounds.restarts import (
    RESTART_FILE,
    ActorRestarts,
    ClientProcessDied,
    Restart,
    process_died,
    read_history,
    simulation_engine_here,
)
from server_app import launch
from tests.helpers import GLOBAL, begin_round, train_reply, validated

SEED, RATE = 21, 0.1
# The reason Flower 1.42's simulation gives (ErrorCode.UNKNOWN) for a message whose ClientAppActor's process died,
# as logged by the slow run below (trimmed of the actor's id, pid and address lines).
DEAD = (
    "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task.\n"
    "\tclass_name: ClientAppActor\n"
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
    "Worker unexpectedly exits with a connection error code 2. End of file.'>"
)
FIRST_LINE = "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly before finishing this task."


def error_reply(code: int, reason: str, node: int = 1) -> Message:
    request = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=node, message_type="train")
    return Message(Error(code=code, reason=reason), reply_to=request)


def test_the_seed_kills_one_client_in_round_1_only():
    assert [[p for p in range(4) if fails(SEED, rnd, p, RATE)] for rnd in (1, 2, 3)] == [[3], [], []]


def test_a_dead_actor_is_told_from_a_client_that_raised(flower_identity):
    assert process_died(error_reply(0, DEAD))
    assert process_died(error_reply(0, "<class 'ray.exceptions.RayActorError'>:<'The actor died.'>"))
    assert not process_died(error_reply(2, DEAD))  # CLIENT_APP_RAISED_EXCEPTION: the ClientApp's own exception
    assert not process_died(error_reply(0, "<class 'ValueError'>:<'ray.exceptions.ActorDiedError'>"))
    assert not process_died(error_reply(8, "ClientApp stopped responding."))  # a deployed node's crashed ClientApp
    assert not process_died(train_reply(GLOBAL, 3))


def test_the_round_policy_keeps_the_deaths_of_the_round_and_counts_them_failed(flower_identity):
    policy = RoundPolicy(FedAvg(fraction_train=1.0, min_train_nodes=1, min_available_nodes=1))
    begin_round(policy, ArrayRecord(GLOBAL), nodes=2)
    replies = [error_reply(0, DEAD, node=1), train_reply({k: v + 1 for k, v in GLOBAL.items()}, 3, node=2)]
    arrays, metrics = policy.aggregate_train(1, replies)
    assert policy.deaths == {1: [DEAD]}
    assert (metrics["replies"], metrics["failed"]) == (1, 1)
    assert torch.equal(arrays.to_torch_state_dict()["w"], GLOBAL["w"] + 1)


def test_the_engine_is_found_only_where_ray_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert not simulation_engine_here()
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    assert simulation_engine_here()
    monkeypatch.delitem(sys.modules, "ray")
    assert not simulation_engine_here()


@pytest.mark.parametrize(
    ("server_round", "used", "in_simulation", "restarts"),
    [
        (1, 0, True, True),
        (2, 2, True, True),  # the third restart of at most 3
        (3, 0, True, False),  # the last round: nothing is left to restart for
        (1, 3, True, False),  # restarts spent: go on with the dead actor
        (1, 0, False, False),  # a deployed federation: its SuperNodes start a new ClientApp per message
    ],
)
def test_a_restart_is_due_only_with_rounds_left_restarts_left_and_inside_the_simulation(
    tmp_path, server_round, used, in_simulation, restarts
):
    plan = ActorRestarts(3, 3, tmp_path, [Restart(1, "earlier")] * used, in_simulation)
    assert plan.due(server_round, []) is None
    assert (plan.due(server_round, [DEAD]) == FIRST_LINE) is restarts


def test_no_restart_with_actor_restarts_0(tmp_path):
    plan = ActorRestarts(0, 3, tmp_path, [], True)
    plan.after_round(1, [DEAD])  # goes on
    assert not (tmp_path / RESTART_FILE).exists()


def test_a_restart_leaves_its_history_and_the_resumed_run_carries_it_on(tmp_path):
    first, second = tmp_path / "111", tmp_path / "222"
    first.mkdir()
    second.mkdir()
    with pytest.raises(ClientProcessDied, match=r"died in round 1 .* restarts from round 1 .*restart 1 of at most"):
        ActorRestarts(3, 5, first, [], True).after_round(1, [DEAD, DEAD])
    assert read_history(first) == [Restart(1, FIRST_LINE)]
    resumed = ActorRestarts.of(3, 5, second, str(first / "checkpoint.pt"))  # a folder or its checkpoint
    assert resumed.history == [Restart(1, FIRST_LINE)] and not resumed.in_simulation  # no Ray in this process
    resumed.in_simulation = True
    with pytest.raises(ClientProcessDied, match="restart 2 of at most actor-restarts=3"):
        resumed.after_round(3, [DEAD])
    assert [r.after_round for r in read_history(second)] == [1, 3]
    assert ActorRestarts.of(3, 5, tmp_path / "333", str(second)).summary() == [
        {"after-round": 1, "reason": FIRST_LINE},
        {"after-round": 3, "reason": FIRST_LINE},
    ]
    assert ActorRestarts.of(3, 5, tmp_path / "444").history == []


def test_the_launcher_resumes_a_run_that_ended_for_a_restart_at_most_actor_restarts_times(tmp_path):
    ready = launch.Ready({}, "", output_dir=str(tmp_path), actor_restarts=2)
    (tmp_path / "7").mkdir()
    failed, completed = {"run-id": "7", "status": "finished:failed"}, {"run-id": "7", "status": "finished:completed"}
    assert launch.restart_folder(failed, ready, 0) is None  # failed for another reason: no restart.json
    with pytest.raises(ClientProcessDied):
        ActorRestarts(2, 3, tmp_path / "7", [], True).after_round(1, [DEAD])
    assert launch.restart_folder(failed, ready, 0) == tmp_path / "7"
    assert launch.restart_folder(failed, ready, 1) == tmp_path / "7"
    assert launch.restart_folder(failed, ready, 2) is None
    assert launch.restart_folder(completed, ready, 0) is None


def test_the_status_read_back_is_the_new_run_s_not_the_largest_id(monkeypatch):
    runs = {"runs": [{"run-id": "9", "status": "finished:failed"}, {"run-id": "5", "status": "finished:completed"}]}
    listed = types.SimpleNamespace(stdout=json.dumps(runs))
    monkeypatch.setattr(launch.subprocess, "run", lambda *args, **kwargs: listed)
    assert launch.last_run({}, earlier=["9"])["run-id"] == "5"  # Flower's run ids are random
    assert launch.last_run({})["run-id"] == "9"


def test_actor_restarts_is_a_count():
    assert validated(actor_restarts=0).actor_restarts == 0
    with pytest.raises(ConfigError, match="actor-restarts"):
        validated(actor_restarts=-1)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("actor-death")
    overrides = (
        "num-server-rounds=3 local-epochs=1 num-clients=4 fraction-train=1.0 image-size=8 "
        f"seed={SEED} fail-rate={RATE} fail-mode='exit' output-dir='{out}'"
    )
    assert launch.main(["--run-config", overrides]) == 0  # finished:completed, after one restart
    return out


def finished_run(out):
    (run,) = [path.parent for path in out.glob(f"*/{SUMMARY}")]
    return run


@pytest.mark.slow
def test_a_client_process_that_dies_is_a_failed_reply_and_the_run_goes_on(out):
    rows = read_metrics(finished_run(out))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["failed"] >= 1 and rows[1]["replies"] >= 1
    assert all(r["replies"] >= 1 and r["replies"] + r["failed"] == 4 for r in rows[1:])


@pytest.mark.slow
def test_the_dead_actor_is_replaced_so_later_rounds_get_every_reply(out):
    assert [r["replies"] for r in read_metrics(finished_run(out))[2:]] == [4, 4]


@pytest.mark.slow
def test_the_run_restarted_once_after_round_1_and_says_so(out):
    run = finished_run(out)
    (stopped,) = [path.parent for path in out.glob(f"*/{METRICS}") if path.parent != run]
    assert [r["round"] for r in read_metrics(stopped)] == [0, 1] and not (stopped / SUMMARY).exists()
    assert [r.after_round for r in read_history(stopped)] == [1]
    (restart,) = read_summary(run)["actor-restarts"]
    assert restart["after-round"] == 1 and restart["reason"].startswith("<class 'ray.exceptions.ActorDiedError'>")
