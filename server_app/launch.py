"""Run the app with `flwr run .` on a private local SuperLink, end to end, failing loudly.

Flower 1.42's `flwr run .` always goes through a SuperLink, prints logs only with `--stream`, exits 0
when the ServerApp raised, and its auto-started local SuperLink re-installs the project's
dependencies at run time. This launcher hides none of that; it handles it:

1. runs every check (`server_app.preflight`, with this launch's simulation: client resources, GPUs, the
   Ray cluster to join) on the run config (pyproject defaults + overrides), so bad input fails before Ray
   starts; in a child process (`server_app.apart`), so that torch and the data the checks load do not stay
   resident in this one for the whole run;
2. starts `flower-superlink --simulation --disable-runtime-dependency-installation` on a free
   loopback port with its own FLWR_HOME (the user's ~/.flwr is left alone);
3. runs `flwr run . <connection> --stream` with the overrides and the simulation federation from
   `[tool.mllm-llava-fl.simulation]` (num-supernodes = num-clients), whose client resources
   `--federation-config` may override;
4. reads the run's final status with `flwr list --format json` and exits non-zero unless it completed; a
   run that ended because a ClientApp process died (`rounds.restarts`) is resumed from its run folder with
   fresh Ray actors, at most `actor-restarts` times;
5. stops everything it started before it returns, and a watchdog (`server_app.watchdog`) stops it all
   too when the launcher itself is killed, even with kill -9.

Usage: python -m server_app.launch [--run-config 'k=v k2="two words"'] [--run-config more.toml]
                                  [--federation-config "client-resources-num-gpus=0.25"]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from flcore.config import ConfigError, Settings
from flcore.run_config import format_overrides, parse_overrides, toml_document
from server_app.apart import call_apart, fork_is_safe
from server_app.watchdog import Watchdog, exit_on_signals, stop

if TYPE_CHECKING:  # the checks import torch: this process imports them only where it runs them itself
    from server_app.preflight import Checked, Simulation

PROJECT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # flwr and flower-superlink of this environment
CONNECTION = "mllm-sim"
SIMULATION_ARGS = ("--insecure", "--simulation")
PATH_KEYS = ("data-dir", "output-dir", "resume")


def project_settings(project: Path = PROJECT) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run-config defaults and the simulation federation declared in pyproject.toml."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())
    return meta["tool"]["flwr"]["app"]["config"], meta["tool"]["mllm-llava-fl"]["simulation"]


def resolve(overrides: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[Settings, dict]:
    """Validated full config, and the overrides to send, with paths made absolute.

    Paths become absolute because the ServerApp and ClientApps run in the SuperLink's processes, not here.
    """
    from server_app.preflight import validated

    sent = dict(overrides)
    for key in PATH_KEYS:
        value = sent.get(key, defaults.get(key, ""))
        if value:
            sent[key] = str(Path(str(value)).expanduser().resolve())
    cfg = validated({**defaults, **sent})
    return cfg, sent


def check_before_start(cfg: Settings, simulation: Simulation | None = None) -> Checked:
    """Every check of the run (`server_app.preflight`) here, so bad input fails before Ray; say what runs."""
    from server_app.preflight import preflight

    checked = preflight(cfg, simulation)
    if checked.resumed is not None:
        print(f"resume: continuing after round {checked.resumed.round} from {cfg.resume}", flush=True)
    if simulation is not None and simulation.ray_address:
        print(f"ray: the simulation joins the cluster at {simulation.ray_address}", flush=True)
    prep = checked.prepared
    if cfg.local_data:
        print(
            f"data: {cfg.dataset} | clients hold their own images (client-data=local) | D_align "
            f"{len(prep.split.align)} from {cfg.align_source} | test {len(prep.dataset.test)}"
            + (f" | {checked.images}" if checked.images else ""),
            flush=True,
        )
        return checked
    sizes = [len(c) for c in prep.split.clients]
    print(
        f"data: {cfg.dataset} | pool {len(prep.split.pool)} images (IF {cfg.imbalance_factor}) | "
        f"{len(sizes)} clients ({cfg.partitioner}), {min(sizes)}-{max(sizes)} images each | "
        f"D_align {len(prep.split.align)} from {cfg.align_source} | "
        f"test {len(prep.dataset.test)}" + (f" | {checked.images}" if checked.images else ""),
        flush=True,
    )
    return checked


@dataclass(frozen=True)
class Ready:
    """What the launcher keeps of its checks: the overrides to send and the simulation's `--federation-config`;
    `refused` instead: the one-line reason the input was refused."""

    sent: dict[str, Any]
    federation: str
    refused: str = ""
    output_dir: str = ""
    actor_restarts: int = 0


def get_ready(
    overrides: Mapping[str, Any],
    defaults: Mapping[str, Any],
    declared: Mapping[str, Any],
    federation: Mapping[str, Any],
    ray_address: str,
) -> Ready:
    """Resolve and check the run with its simulation (`Simulation`'s fields); meant for a child process (`run`),
    so it answers with plain data only."""
    from server_app.preflight import InputError, Simulation

    try:
        cfg, sent = resolve(overrides, defaults)
        checked = check_before_start(cfg, Simulation(declared, federation, ray_address))
    except InputError as err:
        return Ready({}, "", refused=str(err))
    return Ready(sent, federation_config(checked.federation, cfg), "", cfg.output_dir, cfg.actor_restarts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_connection(home: Path, port: int, name: str = CONNECTION, root_certificates: Path | None = None) -> None:
    """A `[superlink.<name>]` connection in $FLWR_HOME/config.toml: insecure, or TLS checked against a CA file."""
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n'
    )


def start_process(cmd: Sequence[str], log_path: Path, env: Mapping[str, str], append: bool = False) -> subprocess.Popen:
    """A Flower process in its own process group (so `stop` reaches its children), logging to a file (appended
    to with `append`: a restarted process keeps its earlier log)."""
    with log_path.open("a" if append else "w") as log:
        return subprocess.Popen(
            list(cmd), cwd=PROJECT, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_port(proc: subprocess.Popen, port: int, log_path: Path, timeout: float = 60) -> None:
    """Return once 127.0.0.1:port accepts connections; fail fast if the process died or never listened."""
    name = Path(str(proc.args[0])).name
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}; see {log_path}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{name} did not open 127.0.0.1:{port} within {timeout:.0f} s; see {log_path}")


def start_superlink(
    home: Path, port: int, env: Mapping[str, str], args: Sequence[str] = SIMULATION_ARGS
) -> subprocess.Popen:
    """`flower-superlink` on 127.0.0.1:port (simulation by default), ready when it returns."""
    log_path = home / "superlink.log"
    cmd = [str(BIN / "flower-superlink"), *args, "--disable-runtime-dependency-installation"]
    proc = start_process([*cmd, "--host", "127.0.0.1", "--port", str(port)], log_path, env)
    wait_for_port(proc, port, log_path)
    return proc


def federation_config(simulation: Mapping[str, Any], cfg: Settings) -> str:
    """num-supernodes follows num-clients, so every partition has exactly one node."""
    return format_overrides({**simulation, "num-supernodes": cfg.num_clients})


def last_run(env: Mapping[str, str], connection: str = CONNECTION, earlier: Collection[str] = ()) -> dict[str, Any]:
    """The status of the run this SuperLink started last: the one not among the `earlier` run ids (Flower's run
    ids are random, so a second run on the same SuperLink is not the largest id)."""
    out = subprocess.run(
        [str(BIN / "flwr"), "list", connection, "--format", "json"],
        cwd=PROJECT,
        env=dict(env),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    runs = [run for run in json.loads(out.stdout).get("runs", []) if run["run-id"] not in earlier]
    if not runs:
        raise RuntimeError(f"the SuperLink reports no run: {out.stdout.strip()}")
    return max(runs, key=lambda r: int(r["run-id"]))


def run_env(home: Path) -> dict[str, str]:
    """Environment of every Flower process we start: private FLWR_HOME, offline hubs, this project importable."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(PROJECT),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def flwr_run(
    connection: str,
    env: Mapping[str, str],
    sent: Mapping[str, Any],
    extra: Sequence[str] = (),
    timeout: float | None = None,
    earlier: Collection[str] = (),
) -> dict[str, Any]:
    """`flwr run . <connection> --stream` with the overrides, then the run's final status from the SuperLink
    (`earlier`: the ids of the runs it ran before this one)."""
    home = Path(env["FLWR_HOME"])
    overrides_file = home / "run-config.toml"
    overrides_file.write_text(toml_document(sent), encoding="utf-8")  # a file: no value is split again
    cmd = [str(BIN / "flwr"), "run", ".", connection, "--stream", *extra]
    if sent:
        cmd += ["--run-config", str(overrides_file)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=PROJECT, env=dict(env), check=False, timeout=timeout)
    return last_run(env, connection, earlier)


def restart_folder(status: Mapping[str, Any], ready: Ready, restarts_done: int) -> Path | None:
    """The run folder to resume with fresh Ray actors, or None: the run did not end for a restart (it left no
    `restart.json`: `rounds.restarts`), or this launch already restarted it `actor-restarts` times."""
    if status["status"] == "finished:completed" or restarts_done >= ready.actor_restarts:
        return None
    from rounds.restarts import read_history  # flwr's records import numpy: only once a run has failed

    folder = Path(ready.output_dir) / str(status["run-id"])
    return folder if read_history(folder) else None


def run_with_restarts(ready: Ready, env: Mapping[str, str], extra: Sequence[str]) -> dict[str, Any]:
    """`flwr_run`, and again with `resume` of its run folder each time the run ended because a ClientApp process
    died (at most `actor-restarts` times): a new simulation starts a new pool of Ray actors, which Flower 1.42
    does not do for a dead one. Returns the last run's status."""
    sent = ready.sent
    status = flwr_run(CONNECTION, env, sent, extra)
    earlier = [status["run-id"]]
    while (folder := restart_folder(status, ready, len(earlier) - 1)) is not None:
        from rounds.restarts import read_history

        history = read_history(folder)  # the restarts of the whole run, earlier launches' included
        print(
            f"restart {len(history)} of at most {ready.actor_restarts}: a client process died in round "
            f"{history[-1].after_round}; resuming {folder} with fresh Ray actors",
            flush=True,
        )
        sent = {**sent, "resume": str(folder)}
        status = flwr_run(CONNECTION, env, sent, extra, earlier=earlier)
        earlier.append(status["run-id"])
    return status


def report_status(status: Mapping[str, Any], logs: str) -> int:
    """0 when the run completed; otherwise say so and where to look (flwr run itself exits 0 either way)."""
    print(f"run {status['run-id']}: {status['status']}", flush=True)
    if status["status"] != "finished:completed":
        print(
            f"error: run {status['run-id']} did not complete ({status['status']}); the log above and {logs} say why.",
            file=sys.stderr,
        )
        return 1
    return 0


def run(overrides: Mapping[str, Any], ray_address: str = "", federation: Mapping[str, Any] | None = None) -> int:
    """One run on a private SuperLink; with `ray_address` the simulation joins that Ray cluster (RAY_ADDRESS);
    `federation` overrides the client resources of the simulation."""
    defaults, declared = project_settings()
    checks = call_apart if fork_is_safe() else lambda fn, *args: fn(*args)
    ready = checks(get_ready, overrides, defaults, declared, federation or {}, ray_address)
    if ready.refused:
        print(f"error: {ready.refused}", file=sys.stderr)
        return 2
    port = free_port()
    home = PROJECT / ".flwr" / f"sim-{port}"  # one FLWR_HOME per launch: concurrent launches stay apart
    env = run_env(home)
    if ray_address:  # Flower's Ray backend calls ray.init() without an address: Ray then reads RAY_ADDRESS
        env["RAY_ADDRESS"] = ray_address
    write_connection(home, port)
    link = start_superlink(home, port, env)
    watchdog = Watchdog.start([link.pid])  # ends all of it if this process dies, and Ray's stragglers at the end
    try:
        status = run_with_restarts(ready, env, ["--federation-config", ready.federation])
    finally:
        stop(link)
        watchdog.close()
    code = report_status(status, str(home / "superlink.log"))
    if code == 0:
        shutil.rmtree(home, ignore_errors=True)
    return code


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are a `ConfigError` (printed as the launchers' one `error:` line, exit code 2)
    instead of a usage block on stderr and `SystemExit`."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}; see --help.")


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM and SIGINT unwind through `run`'s `finally`, which stops the SuperLink and everything it started;
    # the default action would leave them running.
    exit_on_signals()
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run-config",
        "-c",
        action="append",
        default=[],
        help="overrides: 'k=v k2=\"two words\"' (TOML values, bare words as strings) or a TOML file; repeatable",
    )
    parser.add_argument(
        "--federation-config",
        "-f",
        action="append",
        default=[],
        help="client resources of the simulation: 'client-resources-num-cpus=2 client-resources-num-gpus=0.25'",
    )
    parser.add_argument(
        "--ray-address",
        default=os.environ.get("RAY_ADDRESS", ""),
        help="join this running Ray cluster (e.g. 10.0.0.1:6379) instead of starting one; default: $RAY_ADDRESS",
    )
    try:
        args = parser.parse_args(argv)
        overrides, federation = parse_overrides(args.run_config), parse_overrides(args.federation_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(overrides, args.ray_address, federation)


if __name__ == "__main__":
    sys.exit(main())
