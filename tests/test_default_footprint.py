"""Issue 29 item 3, the default run within 4 GiB summed RSS: the cheap parts that keep it there.

`python -m bench.default_run` measures the whole run (it is too slow for the tests); what is checked here is
what it found: the launcher, alive for the whole run, holds no torch and no data once its checks have passed
(they run in a child process, `server_app.apart`), and the default simulation gives each client actor 2 CPUs,
one actor (one torch process) on a 2-core machine.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from bench import default_run
from flcore.config import ConfigError
from server_app import launch
from server_app.apart import ChildFailed, call_apart, fork_is_safe
from server_app.preflight import Simulation, check_simulation
from tests.helpers import TINY, run_config, validated


def test_the_launcher_holds_no_torch_after_its_checks(tmp_path):
    """A fresh launcher process checks a run (data loaded, split drawn) and a refused one, and has not imported
    torch, numpy or the data libraries: they were loaded in the checks' child, gone with it."""
    script = textwrap.dedent(
        f"""
        import sys
        from flcore.run_config import parse_overrides
        from server_app import launch
        defaults, declared = launch.project_settings()
        assert launch.fork_is_safe()  # one thread, no torch: run() puts its checks in a child
        tiny = parse_overrides([{run_config({**TINY, "output-dir": str(tmp_path)})!r}])
        ready = launch.call_apart(launch.get_ready, tiny, defaults, declared, {{}}, "")
        assert not ready.refused and "num-supernodes=4" in ready.federation, ready
        refused = launch.call_apart(launch.get_ready, {{"imbalance-factor": 0.5}}, defaults, declared, {{}}, "")
        assert "'imbalance-factor' = 0.5" in refused.refused, refused
        heavy = sorted(m for m in ("torch", "numpy", "sklearn", "flwr_datasets", "ray") if m in sys.modules)
        print("heavy:", heavy)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(launch.PROJECT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], cwd=launch.PROJECT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heavy: []" in out.stdout
    assert "data: digits" in out.stdout  # the checks said what runs, from the child


def test_a_child_answers_with_its_value_its_traceback_or_how_it_died():
    assert not fork_is_safe()  # this process holds torch: run() checks in-process, a fork could deadlock
    assert call_apart(divmod, 7, 2) == (3, 1)
    with pytest.raises(ChildFailed, match=r"(?s)Traceback.*ZeroDivisionError"):
        call_apart(divmod, 1, 0)
    with pytest.raises(ChildFailed, match="ended with exit code 3 before answering"):
        call_apart(os._exit, 3)


def test_the_default_simulation_runs_one_actor_of_two_cpus_on_two_cores(monkeypatch):
    from server_app import preflight

    declared = launch.project_settings()[1]
    assert declared["client-resources-num-cpus"] == 2
    cfg = validated(TINY)
    # Ray starts cores // CPUs-per-actor actors: 1 on 2 cores; on one core the default shrinks to fit
    for cores, per_actor in ((2, 2), (3, 2), (16, 2), (1, 1)):
        monkeypatch.setattr(preflight, "machine_cpus", lambda cores=cores: cores)
        options = check_simulation(cfg, Simulation(declared))
        assert options["client-resources-num-cpus"] == per_actor
    with pytest.raises(ConfigError, match=r"'client-resources-num-cpus' = 2 is more than this machine has"):
        check_simulation(cfg, Simulation(declared, {"client-resources-num-cpus": 2}))  # said explicitly: refused
    one_cpu_nodes = [preflight.NodeResources(1.0, 0.0), preflight.NodeResources(1.0, 0.0)]
    monkeypatch.setattr(preflight, "ray_cluster_nodes", lambda address: one_cpu_nodes)
    options = check_simulation(cfg, Simulation(declared, ray_address="10.0.0.1:6379"))
    assert options["client-resources-num-cpus"] == 1  # a cluster of 1-CPU nodes: one actor on each node


def test_the_bench_names_every_process_of_a_run():
    root = "/venv/bin/python -m server_app.launch --run-config x"
    named = {
        root: "launcher's checks (child)",  # a child with the launcher's own command line
        "/venv/bin/python -m server_app.watchdog 12": "watchdog",
        "/venv/bin/python /venv/bin/flower-superlink --insecure": "SuperLink",
        "/venv/bin/python /venv/bin/flower-superexec --insecure": "SuperExec",
        "/venv/bin/python /venv/bin/flwr run . mllm-sim --stream": "flwr CLI",
        "/venv/bin/python /venv/bin/flwr-simulation --runtime-api-address x": "simulation (ServerApp, Ray driver)",
        "ray::ClientAppActor": "ClientApp actors",
        "/venv/lib/ray/core/src/ray/raylet/raylet --x": "Ray's own processes",
        "ray::DashboardAgent": "Ray's own processes",
    }
    for command, name in named.items():
        assert default_run.kind(2, 1, command, root) == name
    assert default_run.kind(1, 1, root, root) == "launcher"
