"""GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME: NCCL's filter (prefixes, ^ exclusion, = exact) applied to a node's
interfaces, giving gloo one exact name."""
import pytest

from fastclr.slurm.interfaces import gloo_env, gloo_interface, local_interfaces, matches

NODE = ["lo", "eno1", "docker0", "ib0", "ib1", "eth10"]


@pytest.mark.parametrize("spec,want", [
    ("ib", "ib0"),  # a prefix: the first interface it admits
    ("eth", "eth10"),
    ("=eth1", None),  # exact: eth10 is not eth1
    ("=eth10", "eth10"),
    ("^docker,lo", "eno1"),  # exclusions: the first other one
    ("^lo,eno,docker", "ib0"),
    ("^=docker0", "eno1"),  # exact exclusion; the loopback never comes out of an exclusion list
    ("ib1:5000", "ib1"),  # NCCL's optional :port
    ("ib1,eno", "eno1"),  # interface order decides, not the order of the list
    ("lo", "lo"),  # asked for by name
    ("mlx", None),
    ("", None),
])
def test_gloo_gets_the_first_exact_name_nccl_would_admit(spec, want):
    assert gloo_interface(spec, NODE) == want


def test_matches_follows_nccl_syntax():
    assert matches("ib", "ib0") and not matches("ib", "eib0")
    assert not matches("^ib", "ib0") and matches("^ib", "eth0")
    assert matches("=ib0", "ib0") and not matches("=ib0", "ib01")
    assert not matches("^=ib0,eth0", "eth0") and matches("^=ib0,eth0", "eth01")  # one "=" for the whole list


def test_environment_of_a_task():
    assert gloo_env({}, NODE) == ({}, None)  # nothing set: gloo's own choice
    assert gloo_env({"NCCL_SOCKET_IFNAME": "ib", "GLOO_SOCKET_IFNAME": "eno1"}, NODE) == ({}, None)  # the user's
    env, note = gloo_env({"NCCL_SOCKET_IFNAME": "^docker,lo"}, NODE)
    assert env == {"GLOO_SOCKET_IFNAME": "eno1"} and "eno1" in note
    env, note = gloo_env({"NCCL_SOCKET_IFNAME": "mlx5"}, NODE)
    assert env == {} and "mlx5" in note and "left unset" in note


def test_this_machine_lists_its_loopback():
    assert "lo" in local_interfaces()
