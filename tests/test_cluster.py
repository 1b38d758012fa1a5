"""Past one machine: the launcher joins a running Ray cluster, spreads its clients over its nodes, and
leaves the cluster running. Two Ray nodes on this machine stand for two machines."""

import socket
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, HTTPServer

import grpc
import pytest
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

from server_app import launch
from server_app import preflight as preflight_checks

RUN = (
    "num-clients=4 num-server-rounds=2 fraction-train=1.0 local-epochs=1 image-size=8 projection-dim=16 "
    "dirichlet-alpha=100.0"
)


@pytest.mark.slow
def test_the_launcher_joins_a_two_node_ray_cluster_uses_both_nodes_and_leaves_it_running(tmp_path):
    import ray
    from ray._private.state import actors  # the GCS's actor table; ray.util.state would need the dashboard
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)  # one CPU per node and per client: two client actors need both nodes
    cluster.wait_for_nodes()
    try:
        assert launch.main(["--ray-address", cluster.address, "--run-config", f"{RUN} output-dir={tmp_path}"]) == 0
        ray.init(address=cluster.address)
        assert sum(node["Alive"] for node in ray.nodes()) == 2  # the launcher left the cluster running
        clients = [a for a in actors().values() if a["ActorClassName"].endswith("ClientAppActor")]
        assert len({a["Address"]["NodeID"] for a in clients}) == 2  # client actors ran on both nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_an_address_no_ray_cluster_answers_stops_before_anything_starts(no_superlink, capsys):
    assert launch.main(["--ray-address", "127.0.0.1:1", "--run-config", RUN]) == 2
    assert "--ray-address '127.0.0.1:1': no Ray cluster answers there" in capsys.readouterr().err


class FakeGcs(gcs_service_pb2_grpc.NodeResourceInfoGcsServiceServicer):
    """A Ray GCS that reports one node of 4 CPUs and no GPU (Ray's own service definition, served by grpcio)."""

    def GetAllTotalResources(self, request, context):
        reply = gcs_service_pb2.GetAllTotalResourcesReply()
        reply.resources_list.add(resources_total={"CPU": 4.0, "memory": 2.0**30})
        return reply


@pytest.fixture
def fake_gcs():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gcs_service_pb2_grpc.add_NodeResourceInfoGcsServiceServicer_to_server(FakeGcs(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def silent_port():
    """A port that accepts connections and never answers (a service that is not Ray, waiting for its client)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield f"127.0.0.1:{listener.getsockname()[1]}"


class Quiet(BaseHTTPRequestHandler):
    """Answers every request with an error page, and logs nothing."""

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_port():
    server = HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.mark.parametrize("listener", ["silent_port", "http_port"])
def test_a_port_where_something_else_listens_is_refused_before_start(
    no_superlink, capsys, monkeypatch, listener, request
):
    """Issue 28 item 8: an open port that is not a Ray GCS passed the port check and the run hung at round 1."""
    address = request.getfixturevalue(listener)
    monkeypatch.setattr(preflight_checks, "RAY_TIMEOUT_S", 2.0)
    assert launch.main(["--ray-address", address, "--run-config", RUN]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--ray-address '{address}': no Ray cluster answers there within 2 s" in err and "\n" not in err


def test_a_ray_cluster_is_asked_for_its_nodes_and_a_client_must_fit_on_one(no_superlink, capsys, fake_gcs):
    """Issue 28 item 6 on a cluster: the client resources are checked against the cluster's largest node."""
    assert preflight_checks.ray_cluster_nodes(fake_gcs) == [preflight_checks.NodeResources(4.0, 0.0)]
    args = ["--ray-address", fake_gcs, "--run-config", RUN, "--federation-config", "client-resources-num-cpus=8"]
    assert launch.main(args) == 2
    err = capsys.readouterr().err
    assert f"'client-resources-num-cpus' = 8 is more than the Ray cluster at {fake_gcs} has (4 CPU(s)" in err
