import pytest
import ray

from raysys.runtime import init_ray
from raysys.runtime.errors import ClusterError, RemoteTimeout
from raysys.runtime.ray_env import bounded_get, check_reachable, project_runtime_env


def test_init_ray_reuses_the_session_cluster(ray_cluster):
    assert init_ray() == "initialized"


def test_provider_nodes_declare_gpus_and_labels(ray_cluster, add_provider):
    add_provider("lab-x", num_gpus=2)
    ray_cluster.wait_for_nodes()
    nodes = [
        n for n in ray.nodes() if n["Alive"] and "provider:lab-x" in n["Resources"]
    ]
    assert len(nodes) == 1
    assert nodes[0]["Resources"]["GPU"] == 2
    assert nodes[0]["Labels"]["raysys.io/provider"] == "lab-x"


def test_bounded_get_raises_named_timeout(ray_cluster):
    @ray.remote
    def slow():
        import time

        time.sleep(30)

    ref = slow.remote()
    try:
        bounded_get(ref, 0.5, "the slow probe")
    except RemoteTimeout as e:
        assert "the slow probe" in str(e) and "0.5" in str(e)
    else:
        raise AssertionError("bounded_get did not time out")
    finally:
        ray.cancel(ref, force=True)


def test_runtime_env_excludes_history_envs_and_data():
    env = project_runtime_env()
    for name in (".git", ".venv", "/data", "/out"):
        assert name in env["excludes"]


def test_an_address_nothing_answers_on_fails_at_once():
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(
        ClusterError, match=f"cannot reach a Ray cluster at 127.0.0.1:{port}"
    ):
        check_reachable(f"127.0.0.1:{port}")
    check_reachable("auto")  # other forms are left to Ray
