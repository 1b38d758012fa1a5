"""Every check that can fail before round 1, in one place, run before any Flower process starts.

The launcher (`server_app.launch`) and `deploy.local_cluster` call `preflight` before they start the
SuperLink; the ServerApp calls it again first thing (a run started with `flwr run` on a real SuperLink has
no launcher). It resolves `device` and `amp` once in this process (a GPU it does not see names the key; the
result comes back in `Checked.compute` for the caller to use), checks the launcher's simulation when there
is one (`Simulation`: no client-data=local, the client resources of `--federation-config` against the
`device`/`amp` asked for and the CPUs and GPUs of this machine or of the Ray cluster to join, which must answer
as one within a timeout), reads the checkpoint to resume from, estimates the memory a training process needs
beside the decoded dataset (`flcore.memory`) before decoding anything, loads the dataset and draws the split
(a split the settings cannot produce names the key to change), decodes the image files (`flcore.images`),
estimates the memory again with the dataset's classes and the size of the clients' uploads, and runs the
strategy's and every server stage's own checks (teachers' weights on disk, class names, logits files,
pretraining data). Each problem is a `ConfigError` or
`DataNotFound` naming the key or file; the launcher prints it on one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flcore import datasets
from flcore.class_statistics import upload_bytes
from flcore.config import ConfigError, Settings, validate
from flcore.datasets import DataNotFound
from flcore.device import Compute, compute_of, visible_gpus
from flcore.files import unwritable
from flcore.images import check_images
from flcore.loggers import check_loggers
from flcore.memory import check_memory, data_bytes
from flcore.models import classifier_width, model_head
from flcore.run_data import Prepared, prepare
from rounds import checkpoint
from rounds.delegate import Delegating
from strategies.class_uploads import ClientUploads, UploadsAfterAggregation
from strategies.registry import SERVER_STAGES, STRATEGIES, build_strategy, check_strategy

InputError = (ConfigError, DataNotFound)
CLIENT_RESOURCES = ("client-resources-num-cpus", "client-resources-num-gpus")  # what --federation-config may set
RAY_TIMEOUT_S = 10.0  # how long the Ray cluster to join has to answer
UPLOADERS = (ClientUploads, UploadsAfterAggregation)  # strategies whose clients upload class statistics


def validated(run_config: Mapping[str, Any]) -> Settings:
    """The run config checked against the schema, with the registry's strategy names."""
    return validate(run_config, choices={"strategy": STRATEGIES})


@dataclass(frozen=True)
class Simulation:
    """The launcher's simulation: the federation pyproject declares, the `--federation-config` overrides of
    its client resources, and the Ray cluster to join ('' starts one)."""

    declared: Mapping[str, Any]
    overrides: Mapping[str, Any] = field(default_factory=dict)
    ray_address: str = ""


@dataclass(frozen=True)
class Checked:
    """What the checks read on the way: the data and split, the checkpoint to resume from (or None), this
    process's compute settings, and the simulation's checked federation options (None without a simulation)."""

    prepared: Prepared
    resumed: checkpoint.Checkpoint | None
    compute: Compute
    images: str = ""
    federation: dict[str, Any] | None = None


def preflight(cfg: Settings, simulation: Simulation | None = None) -> Checked:
    """Raise `ConfigError` / `DataNotFound` on the first problem, before anything trains; `simulation`: the
    launcher's, whose own inputs are checked too."""
    compute = compute_of(cfg)  # this machine's GPUs before the clients' share: the plainest message comes first
    federation = check_simulation(cfg, simulation) if simulation is not None else None
    check_output_dir(cfg)
    check_loggers(cfg)
    resumed = checkpoint.load(cfg) if cfg.resume else None
    held = data_bytes(cfg)
    check_memory(cfg, 1, held=held)  # before decoding the data: one class is the smallest classifier there is
    prepared = prepared_data(cfg)
    images = check_image_files(cfg, prepared)
    check_memory(cfg, prepared.dataset.num_classes, held=held)
    check_upload_size(cfg, prepared.dataset.num_classes)
    check_strategy(cfg, prepared)
    for entry in SERVER_STAGES.values():
        entry.check(cfg, prepared)
    return Checked(prepared, resumed, compute, images, federation)


def check_output_dir(cfg: Settings) -> None:
    """`output-dir` must take files before anything starts: a run that cannot write its reports (a path under
    /proc, a read-only mount) would otherwise fail after the SuperLink and Ray are up, with a traceback."""
    why = unwritable(Path(cfg.output_dir).expanduser())
    if why is not None:
        raise ConfigError(
            f"run-config key 'output-dir' = {cfg.output_dir!r} is not allowed: the run cannot write there ({why}); "
            "give a writable folder."
        )


def check_simulation(cfg: Settings, simulation: Simulation) -> dict[str, Any]:
    """The simulation's own inputs; returns its federation options, checked."""
    refuse_local_data(cfg)
    address = simulation.ray_address
    options = client_resources(simulation.declared, simulation.overrides)
    nodes = ray_cluster_nodes(address) if address else [this_machine()]
    if "client-resources-num-cpus" not in simulation.overrides:
        options = default_cpus_within(options, nodes)
    check_client_devices(cfg, options, address)
    check_client_fits(options, nodes, address)
    return options


def refuse_local_data(cfg: Settings) -> None:
    """The simulation's virtual clients have no data of their own: client-data=local needs real SuperNodes."""
    if cfg.local_data:
        raise ConfigError(
            "run-config key 'client-data' = 'local' is not allowed in the simulation (make run): its virtual "
            "clients hold no images of their own. Start real SuperNodes, each with --node-config "
            "\"data-dir='/path/to/images'\" (docs/deployment.md; on one machine: python -m deploy.local_cluster "
            "--node-data DIR --node-data DIR ...), or use client-data = partition."
        )


def client_resources(simulation: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The simulation federation with `--federation-config` overrides, each checked (Ray takes whole CPUs, and
    a GPU share below 1 or whole GPUs)."""
    unknown = sorted(set(overrides) - set(CLIENT_RESOURCES))
    if unknown:
        raise ConfigError(
            f"--federation-config: unknown option(s) {', '.join(unknown)}; expected {' and '.join(CLIENT_RESOURCES)} "
            "(num-supernodes follows num-clients)."
        )
    options = {**simulation, **overrides}
    cpus, gpus = options["client-resources-num-cpus"], options["client-resources-num-gpus"]
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ConfigError(f"federation option 'client-resources-num-cpus' = {cpus!r}: expected an integer >= 1.")
    if isinstance(gpus, bool) or not isinstance(gpus, int | float) or gpus < 0 or (gpus > 1 and gpus % 1):
        raise ConfigError(
            f"federation option 'client-resources-num-gpus' = {gpus!r}: expected a number >= 0, a fraction below 1 "
            "(0.25: four clients share a GPU) or a whole number of GPUs."
        )
    return options


def default_cpus_within(options: Mapping[str, Any], nodes: list[NodeResources]) -> dict[str, Any]:
    """The declared CPUs per client, at most the largest node's (this machine, or the Ray cluster's): the default
    (2, one actor on a 2-core machine, which keeps the default run within 4 GiB: README, "With less memory")
    then runs on a 1-core machine or a cluster of 1-CPU nodes too, where an explicit
    `client-resources-num-cpus=2` is refused."""
    most = max(1, int(max(n.cpus for n in nodes)))
    return {**options, "client-resources-num-cpus": min(options["client-resources-num-cpus"], most)}


def check_client_devices(cfg: Settings, options: Mapping[str, Any], ray_address: str) -> None:
    """Client actors see only the GPUs Ray gives them (numbered from cuda:0), and none without a GPU share: a
    setting that would leave them waiting for a GPU forever, or make them refuse `device`/`amp`, fails here."""
    gpus = float(options["client-resources-num-gpus"])
    device, amp = cfg.device, cfg.amp
    if gpus > 0 and not ray_address and visible_gpus() == 0:
        raise ConfigError(
            f"federation option 'client-resources-num-gpus' = {gpus:g} needs a GPU, and this machine has none: Ray "
            "would never start a client; expected 0 (or --ray-address of a cluster with GPUs)."
        )
    if gpus == 0 and device.startswith("cuda"):
        raise ConfigError(
            f"run-config key 'device' = {device!r} is not allowed with client-resources-num-gpus = 0: the clients' "
            "Ray actors see no GPU; give them a share (--federation-config client-resources-num-gpus=0.25) or use "
            "device=auto (clients on the CPU, the server on its GPU)."
        )
    if gpus == 0 and amp != "off":
        raise ConfigError(
            f"run-config key 'amp' = {amp!r} is not allowed with client-resources-num-gpus = 0: the clients would "
            "train on the CPU, where there is no mixed precision; expected off, or give clients a GPU share."
        )
    index = int(device.partition(":")[2] or 0)
    if gpus > 0 and index >= max(1, int(gpus)):
        raise ConfigError(
            f"run-config key 'device' = {device!r} is not allowed in the simulation: each client actor sees only the "
            f"{max(1, int(gpus))} GPU(s) Ray gives it, numbered from cuda:0; expected auto or cuda."
        )


@dataclass(frozen=True)
class NodeResources:
    """What one Ray node offers client actors."""

    cpus: float
    gpus: float

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU(s), {self.gpus:g} GPU(s)"


def machine_cpus() -> int:
    """CPUs Ray would find here: those this process may run on, capped by a cgroup CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cpus
    return cpus if quota == "max" else max(1, min(cpus, int(quota) // int(period)))


def this_machine() -> NodeResources:
    """The one node of the Ray instance the simulation starts here."""
    return NodeResources(machine_cpus(), visible_gpus())


def ray_cluster_nodes(address: str) -> list[NodeResources]:
    """The nodes of the Ray cluster at `address`, as its GCS reports them within RAY_TIMEOUT_S seconds. Something
    else listening there (any server, or a port that accepts and stays silent) fails here: an open port alone
    let the simulation hang at round 1."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    host, _, port = address.rpartition(":")
    try:
        with grpc.insecure_channel(f"{host or '127.0.0.1'}:{int(port)}") as channel:
            stub = gcs_service_pb2_grpc.NodeResourceInfoGcsServiceStub(channel)
            reply = stub.GetAllTotalResources(gcs_service_pb2.GetAllTotalResourcesRequest(), timeout=RAY_TIMEOUT_S)
    except grpc.RpcError as err:
        reason = f"{err.code().name}: {' '.join(str(err.details()).split())}"
        raise ConfigError(
            f"--ray-address {address!r}: no Ray cluster answers there within {RAY_TIMEOUT_S:g} s ({reason}); expected "
            "host:port of the GCS of a head node started with `ray start --head`."
        ) from err
    except ValueError as err:
        raise ConfigError(f"--ray-address {address!r}: expected host:port, e.g. 10.0.0.1:6379.") from err
    nodes = [
        NodeResources(n.resources_total.get("CPU", 0.0), n.resources_total.get("GPU", 0.0))
        for n in reply.resources_list
    ]
    if not nodes:
        raise ConfigError(f"--ray-address {address!r}: the Ray cluster there has no nodes.")
    return nodes


def check_client_fits(options: Mapping[str, Any], nodes: list[NodeResources], ray_address: str) -> None:
    """One client actor must fit on one node, or Ray starts none and Flower fails after the SuperLink is up
    ("ActorPool is empty")."""
    cpus, gpus = options["client-resources-num-cpus"], float(options["client-resources-num-gpus"])
    most_cpus = max(n.cpus for n in nodes)
    if ray_address:
        largest = max(nodes, key=lambda n: (n.cpus, n.gpus))
        where = f"the Ray cluster at {ray_address} has ({largest} on its largest node)"
    else:
        where = f"this machine has ({nodes[0]})"
    if cpus > most_cpus:
        raise ConfigError(
            f"federation option 'client-resources-num-cpus' = {cpus} is more than {where}: Ray would start no "
            f"client; expected <= {most_cpus:g}."
        )
    if gpus > 0 and not any(n.cpus >= cpus and n.gpus >= gpus for n in nodes):
        most = max(n.gpus for n in nodes if n.cpus >= cpus)
        raise ConfigError(
            f"federation option 'client-resources-num-gpus' = {gpus:g} is more than {where}: Ray would start no "
            f"client; expected a share below 1, or <= {most:g} GPU(s) beside {cpus} CPU(s)."
        )


def prepared_data(cfg: Settings) -> Prepared:
    """The dataset and split; a failure names the data folder, or the split key the data cannot satisfy."""
    try:
        return prepare(cfg)
    except DataNotFound:
        raise
    except Exception as err:  # a split's refusal, a loader's or flwr-datasets' own error: say which input
        if not cfg.local_data:
            raise explain_failure(cfg, err) from err
        if isinstance(err, ConfigError):  # no split is drawn: D_align's source names its key itself
            raise
        raise unreadable(cfg, err) from err


def unreadable(cfg: Settings, err: Exception) -> DataNotFound:
    where = Path(cfg.data_dir).expanduser() if cfg.data_dir else "scikit-learn"
    return DataNotFound(f"dataset '{cfg.dataset}' in '{where}' cannot be read ({type(err).__name__}: {err}).")


def explain_failure(cfg: Settings, err: Exception) -> Exception:
    """Reload the dataset alone: if that fails the data is unreadable, otherwise the split settings are at fault."""
    try:
        labels = datasets.load(cfg.dataset, cfg.data_dir, cfg.image_size).train.labels
    except Exception as load_err:
        return unreadable(cfg, load_err)
    counts = np.bincount(labels)
    smallest = int(counts.min())
    if cfg.align_per_class >= smallest:
        return ConfigError(
            f"run-config key 'align-per-class' = {cfg.align_per_class} is not allowed for this dataset: its "
            f"smallest class has {smallest} training images, and D_align would leave none of them to the clients; "
            f"expected < {smallest}."
        )
    pool = len(labels) - int(np.minimum(counts, cfg.align_per_class).sum())
    if cfg.num_clients * max(1, cfg.min_partition_size) > pool:
        return ConfigError(
            f"run-config key 'num-clients' = {cfg.num_clients} is not allowed for this dataset: at most {pool} "
            f"images are left for the clients, fewer than num-clients x min-partition-size "
            f"({cfg.min_partition_size})."
        )
    if isinstance(err, ConfigError):  # already names its key
        return err
    return ConfigError(
        f"run-config keys num-clients = {cfg.num_clients}, min-partition-size = {cfg.min_partition_size}, "
        f"dirichlet-alpha = {cfg.dirichlet_alpha}, imbalance-factor = {cfg.imbalance_factor}: the data split "
        f"failed ({type(err).__name__}: {err})."
    )


def check_image_files(cfg: Settings, prepared: Prepared) -> str:
    """Decode the image files the run reads from data-dir (train images of D_align and the pool, all test
    images); nodes holding their own data (client-data=local) check theirs when they read them."""
    train, test = prepared.dataset.train, prepared.dataset.test
    if train.files is None:
        return ""
    align = prepared.split.align if prepared.split.align_from_train else np.zeros(0, dtype=np.int64)
    used = np.concatenate([align, prepared.split.pool])
    which = check_images([train.files[i] for i in used], "data-dir", cfg.seed)
    which_test = check_images(list(test.files or ()), "data-dir", cfg.seed)
    return f"images checked: train {which}, test {which_test}"


def check_upload_size(cfg: Settings, num_classes: int) -> None:
    """A strategy whose clients upload class statistics (CCVR, CReFF) must fit them in `max-upload-mb`, or the
    server would reject every reply of the rounds that need them."""
    strategy = build_strategy(cfg)
    while isinstance(strategy, Delegating) and not isinstance(strategy, UPLOADERS):
        strategy = strategy.inner
    if not isinstance(strategy, UPLOADERS):
        return
    dim = classifier_width(cfg)
    need = upload_bytes(strategy.upload, num_classes, dim)
    if need > cfg.max_upload_mb * 2**20:
        raise ConfigError(
            f"run-config key 'max-upload-mb' = {cfg.max_upload_mb} is not allowed for strategy={cfg.strategy}: "
            f"each client's '{strategy.upload}' upload is {need / 2**20:.1f} MB ({num_classes} classes, {dim}-d "
            f"classifier input, head={model_head(cfg)}); expected >= {need / 2**20:.1f}."
        )
