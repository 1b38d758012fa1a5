"""Past one machine: the launcher joins a running Ray cluster, spreads its clients over its nodes, and
leaves the cluster running. Two Ray nodes on this machine stand for two machines."""

import pytest

from server_app import launch

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
