"""Slurm launch where a real cluster cannot go: fake srun/sbatch/scontrol executables (written into tmp_path, first
on PATH) log their argv; the fake srun starts the tasks the way slurmstepd would, with a probe script standing in for
the trainer. They cover layouts and inputs the two-node local cluster cannot have — 8 nodes × 8 GPUs, 2 × 4 GPU ranks,
malformed node lists, GPU gres arithmetic, DeepSpeed's launcher per node, a batch shell that gets the warning itself
(``B:``), the batch script's exit-status decisions — and the pure functions. The real chain, on a real cluster, with
the real trainer, is tests/test_slurm_cluster.py."""
import importlib.util
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest

from fastclr.slurm import (SlurmError, SlurmWorld, default_master_port, expand_nodelist, hostfile_text,
                           launch_command, node_address, parse_gpu_count, rank_env, requeue, task_command)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launchers", "slurm", "pretrain.sbatch")
SUBMIT = os.path.join(ROOT, "launchers", "slurm", "submit.py")
IMAGENET = os.path.join(ROOT, "launchers", "configs", "imagenet_resnet50_bs4096.yaml")
DATA = ["data.path=/data/imagenet/train-{000000..001023}.tar", "data.eval_path=/data/imagenet/val"]  # not in recipes
JOB = 4242

ENV_2x4 = {"SLURM_JOB_ID": str(JOB), "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_NODEID": "1", "SLURM_PROCID": "0", "SLURM_CPUS_PER_TASK": "6", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_SUBMIT_DIR": ROOT}

FAKE_LOGGER = """#!@PYTHON@
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:]}) + "\\n")
"""

FAKE_SRUN = FAKE_LOGGER + """
import signal, subprocess, time
argv = sys.argv[1:]
i = 0
opts = {}
while i < len(argv) and argv[i].startswith("--"):
    key, _, value = argv[i][2:].partition("=")
    opts[key] = value
    i += 1
command = argv[i:]
if os.environ.get("FAKE_SRUN_RC"):
    # A step that ends at once with this status; FAKE_SRUN_CKPT: a checkpoint completed during it.
    if os.environ.get("FAKE_SRUN_CKPT"):
        os.makedirs(os.environ["FAKE_SRUN_CKPT"] + "/step000000005")
        open(os.environ["FAKE_SRUN_CKPT"] + "/step000000005/COMPLETE", "w").write("{}")
    sys.exit(int(os.environ["FAKE_SRUN_RC"]))
if os.environ.get("FAKE_SRUN_HOLD"):
    # A long step: note the signals srun gets from the batch shell; USR1 ends it like a preempted trainer would.
    def note(sig, frame):
        with open(os.environ["FAKE_LOG"], "a") as f:
            f.write(json.dumps({"prog": "srun", "signal": signal.Signals(sig).name}) + "\\n")
        if sig == signal.SIGUSR1:
            sys.exit(3)
    signal.signal(signal.SIGUSR1, note)
    signal.signal(signal.SIGTERM, note)
    open(os.environ["FAKE_SRUN_HOLD"] + ".ready", "w").close()
    while not os.path.exists(os.environ["FAKE_SRUN_HOLD"]):
        time.sleep(0.05)
    sys.exit(int(os.environ.get("FAKE_SRUN_EXIT", "3")))
# Start every task as slurmstepd does under --distribution=block: task n*per+l is local task l of node n.
nodes = os.environ["FAKE_NODES"].split(",")
n_nodes, per = int(opts["nodes"]), int(opts["ntasks-per-node"])
procs = []
for n in range(n_nodes):
    for l in range(per):
        env = dict(os.environ, SLURM_PROCID=str(n * per + l), SLURM_LOCALID=str(l), SLURM_NODEID=str(n),
                   SLURMD_NODENAME=nodes[n], SLURM_NTASKS=str(n_nodes * per), SLURM_STEP_ID="0")
        procs.append(subprocess.Popen(command, env=env))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"prog": "srun", "task_pids": [p.pid for p in procs]}) + "\\n")
sys.exit(max(p.wait() for p in procs))
"""

FAKE_SBATCH = FAKE_LOGGER + 'print("Submitted batch job 4243")\n'
FAKE_SCONTROL = FAKE_LOGGER + """
if sys.argv[1:3] == ["show", "node"]:
    print("NodeName=%s Arch=x86_64 NodeAddr=%s NodeHostName=%s" % (sys.argv[-1], os.environ.get("FAKE_NODE_ADDR",
          sys.argv[-1]), sys.argv[-1]))
sys.exit(int(os.environ.get("FAKE_SCONTROL_RC", "0")))
"""

# Stands in for launchers/pretrain.py: records what a rank sees; optionally waits for SIGUSR1 like the trainer.
PROBE = """import json, os, signal, sys, time
record = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                         "OMP_NUM_THREADS", "LOCAL_SIZE", "CROSS_RANK")}
record.update(pid=os.getpid(), argv=sys.argv[1:],
              usr1_blocked=signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_BLOCK, []))
out = os.path.join(os.environ["PROBE_DIR"], "rank-%s" % os.environ["RANK"])
if os.environ.get("PROBE_WAIT_USR1"):
    got = []
    signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})  # as the trainer does with its handler in place
    open(out + ".ready", "w").close()
    deadline = time.time() + 30
    while not got and time.time() < deadline:
        time.sleep(0.02)
    record["got_usr1"] = bool(got)
with open(out + ".json", "w") as f:
    json.dump(record, f)
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
"""


@pytest.fixture
def fake(tmp_path):
    """Fake Slurm binaries first on PATH, a probe trainer, and the 2-node × 4-GPU environment of node 1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text.replace("@PYTHON@", sys.executable, 1))
        path.chmod(0o755)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    (tmp_path / "probe").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(ENV_2x4, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", PYTHONPATH=ROOT, FASTCLR_PYTHON=sys.executable,
               FAKE_LOG=str(tmp_path / "calls.jsonl"), FAKE_NODES="gpu07,gpu08", PROBE_DIR=str(tmp_path / "probe"),
               TMPDIR=str(tmp_path))  # mode deepspeed writes its node-local hostfile there

    class Fake:
        pass

    f = Fake()
    f.tmp, f.env, f.probe, f.log = tmp_path, env, str(probe), tmp_path / "calls.jsonl"
    f.calls = lambda: [json.loads(line) for line in f.log.read_text().splitlines()] if f.log.exists() else []
    f.ranks = lambda: {int(p.name[5:-5]): json.loads(p.read_text())
                       for p in (tmp_path / "probe").glob("rank-*.json")}
    return f


def _run(cmd, env, **kw):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=ROOT, **kw)


# --------------------------------------------------------------------------------------------------------------- #
# Node lists


@pytest.mark.parametrize("text, hosts", [
    ("gpu07", ["gpu07"]),
    ("node[01-03,07],gpu-a[1-2]", ["node01", "node02", "node03", "node07", "gpu-a1", "gpu-a2"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),  # no padding: width of the lower bound
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("a1,b2,c[3]", ["a1", "b2", "c3"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("x[1-2].cluster,login", ["x1.cluster", "x2.cluster", "login"]),
    (" gpu[1-2] ", ["gpu1", "gpu2"]),
])
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, why", [
    ("", "empty"), ("node[1-3", "never closed"), ("node1-3]", "without a matching"), ("node[3-1]", "backwards"),
    ("node[a-b]", "digits"), ("node[]", "digits"), ("a,,b", "empty host"), ("node[1-[2]]", "nested"),
    ("[1-2]", "empty host"), ("n[1-]", "digits"),
])
def test_expand_nodelist_rejects_malformed_lists_naming_them(text, why):
    with pytest.raises(SlurmError, match=why):
        expand_nodelist(text)


def _compress(prefix, numbers, width):
    """An independent writer of Slurm's syntax: runs of consecutive numbers become lo-hi."""
    runs, start = [], None
    for a, b in zip(numbers, numbers[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            runs.append(str(start).zfill(width) + ("" if start == a else "-" + str(a).zfill(width)))
            start = None
    return f"{prefix}[{','.join(runs)}]"


def test_expand_nodelist_inverts_an_independent_compressor():
    rng = random.Random(7)
    for _ in range(200):
        groups, expected = [], []
        for _ in range(rng.randint(1, 4)):
            prefix = rng.choice(["gpu", "node-a", "r1n", "x"])
            width = rng.randint(1, 3)
            numbers = sorted(rng.sample(range(0, 130), rng.randint(1, 12)))
            if rng.random() < 0.2:
                name = prefix + str(numbers[0]).zfill(width)
                groups.append(name)
                expected.append(name)
                continue
            groups.append(_compress(prefix, numbers, width))
            expected += [prefix + str(n).zfill(width) for n in numbers]
        assert expand_nodelist(",".join(groups)) == expected


# --------------------------------------------------------------------------------------------------------------- #
# The world


def test_world_from_env_two_nodes_of_four():
    w = SlurmWorld.from_env(ENV_2x4)
    assert w.nodes == ("gpu07", "gpu08") and w.num_nodes == 2 and w.gpus_per_node == 4 and w.world_size == 8
    assert w.master_addr == "gpu07" and w.node_rank == 1 and w.node == "gpu08"
    assert list(w.ranks_on(0)) == [0, 1, 2, 3] and list(w.ranks_on(1)) == [4, 5, 6, 7]
    assert hostfile_text(w) == "gpu07 slots=4\ngpu08 slots=4\n"


def test_master_port_is_the_same_on_every_node_and_differs_between_jobs():
    ports = {SlurmWorld.from_env({**ENV_2x4, "SLURM_NODEID": str(n)}).master_port for n in (0, 1)}
    assert ports == {default_master_port(JOB)}
    assert all(20000 <= default_master_port(j) < 32768 for j in (0, 1, 11999, 12000, 987654321))
    assert len({default_master_port(j) for j in range(1000, 1100)}) == 100
    assert SlurmWorld.from_env(ENV_2x4, master_port=29500).master_port == 29500


@pytest.mark.parametrize("name, value, gpus", [
    ("SLURM_GPUS_PER_NODE", "4", 4), ("SLURM_GPUS_PER_NODE", "gpu:4", 4), ("SLURM_GPUS_PER_NODE", "a100:8", 8),
    ("SLURM_GPUS_PER_NODE", "a100:2,v100:2", 4), ("SLURM_JOB_GPUS", "0,1,2", 3), ("SLURM_GPUS_ON_NODE", "2", 2),
])
def test_gpus_per_node_formats(name, value, gpus):
    env = {k: v for k, v in ENV_2x4.items() if k != "SLURM_GPUS_ON_NODE"}
    assert SlurmWorld.from_env({**env, name: value}).gpus_per_node == gpus
    assert SlurmWorld.from_env({**env, name: value}, gpus_per_node=3).gpus_per_node == 3  # the CLI override wins


def test_gpus_on_node_takes_precedence_over_the_request():
    assert SlurmWorld.from_env({**ENV_2x4, "SLURM_GPUS_PER_NODE": "a100:8"}).gpus_per_node == 4


@pytest.mark.parametrize("drop, add, named", [
    (("SLURM_JOB_ID",), {}, "SLURM_JOB_ID"),
    (("SLURM_JOB_NODELIST",), {}, "SLURM_JOB_NODELIST"),
    (("SLURM_NODEID",), {}, "SLURM_NODEID"),
    (("SLURM_GPUS_ON_NODE",), {}, "SLURM_GPUS_ON_NODE"),
    ((), {"SLURM_NNODES": "3"}, "SLURM_NNODES"),
    ((), {"SLURM_NODEID": "2"}, "SLURM_NODEID"),
    ((), {"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID"),
    ((), {"SLURM_GPUS_ON_NODE": "0"}, "--gpus-per-node"),
    ((), {"SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:x"}, "SLURM_GPUS_PER_NODE"),
])
def test_world_errors_name_the_variable(drop, add, named):
    env = {k: v for k, v in ENV_2x4.items() if k not in drop}
    with pytest.raises(SlurmError, match=named):
        SlurmWorld.from_env({**env, **add})


def test_the_older_nodelist_variable_is_accepted():
    env = {k: v for k, v in ENV_2x4.items() if k != "SLURM_JOB_NODELIST"}
    assert SlurmWorld.from_env({**env, "SLURM_NODELIST": "gpu[07-08]"}).nodes == ("gpu07", "gpu08")


def test_parse_gpu_count_rejects_garbage():
    with pytest.raises(SlurmError, match="SLURM_GPUS_PER_NODE"):
        parse_gpu_count("gpu:", "SLURM_GPUS_PER_NODE")


# --------------------------------------------------------------------------------------------------------------- #
# Commands


def test_rank_mode_environment_mirrors_deepspeeds_launcher():
    env = {**ENV_2x4, "SLURM_PROCID": "6", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8"}
    assert rank_env(SlurmWorld.from_env(env)) == {
        "RANK": "6", "LOCAL_RANK": "2", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(default_master_port(JOB)), "LOCAL_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
        "CROSS_RANK": "1", "CROSS_SIZE": "2"}


@pytest.mark.parametrize("add, named", [
    ({"SLURM_PROCID": "2", "SLURM_LOCALID": "2", "SLURM_NTASKS": "8"}, "block"),   # rank 2 is not on node 1
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8"}, "block"),
    ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2"}, "SLURM_NTASKS"),
    ({"SLURM_LOCALID": ""}, "SLURM_LOCALID"),
])
def test_rank_mode_refuses_a_layout_it_did_not_ask_for(add, named):
    with pytest.raises(SlurmError, match=named):
        rank_env(SlurmWorld.from_env({**ENV_2x4, **add}))


def test_deepspeed_mode_command_parses_with_the_installed_deepspeed_runner():
    runner = pytest.importorskip("deepspeed.launcher.runner")
    world = SlurmWorld.from_env(ENV_2x4)
    cmd, env = task_command(world, "deepspeed", ["train.py", "--config", "r.yaml", "a=1"], hostfile="/tmp/hf")
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    args = runner.parse_args(cmd[4:])
    assert (args.hostfile, args.no_ssh, args.node_rank, args.master_addr, args.master_port, args.num_nodes,
            args.num_gpus) == ("/tmp/hf", True, 1, "gpu07", default_master_port(JOB), 2, 4)
    assert (args.user_script, args.user_args) == ("train.py", ["--config", "r.yaml", "a=1"])
    assert env["OMP_NUM_THREADS"] == str(6 * 4 // 4)  # the node task's CPUs shared by its 4 ranks


def test_launch_command_layouts():
    world = SlurmWorld.from_env(ENV_2x4)
    rank = launch_command(world, "r.yaml", ["a=1"], "rank")
    assert rank[0] == "srun" and "--ntasks=8" in rank and "--ntasks-per-node=4" in rank
    assert "--distribution=block" in rank and "--cpus-per-task=6" in rank
    assert rank[rank.index("--") + 1:][1:] == ["--config", "r.yaml", "a=1"]
    node = launch_command(world, "r.yaml", ["a=1"], "deepspeed")
    assert "--ntasks=2" in node and "--ntasks-per-node=1" in node and "--cpus-per-task=24" in node
    with pytest.raises(SlurmError, match="mode"):
        launch_command(world, "r.yaml", [], "mpi")


def test_plan_dry_run_prints_hostfile_ranks_master_and_command(fake):
    r = _run([sys.executable, "-m", "fastclr.slurm", "plan", "--dry-run", "train.epochs=3"], fake.env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "gpu07 slots=4\ngpu08 slots=4\n" in out
    assert "node 0 gpu07: ranks 0-3\n" in out and "node 1 gpu08: ranks 4-7   <- this node" in out
    assert f"master: gpu07:{default_master_port(JOB)}" in out
    assert "srun --nodes=2 --ntasks=8 --ntasks-per-node=4" in out and "train.epochs=3" in out
    assert "batch: global 256 = micro 32 x accumulation 1 x world 8" in out
    assert "--wait=600 " in out and "--master-addr gpu07 " in out  # distributed.timeout's default
    # gpu07 does not resolve here: plan asked Slurm for its NodeAddr; nothing was started
    assert fake.calls() == [{"prog": "scontrol", "argv": ["show", "node", "-o", "gpu07"]}]


def test_plan_refuses_a_recipe_that_does_not_fit_the_world(fake):
    r = _run([sys.executable, "-m", "fastclr.slurm", "plan", "train.global_batch_size=250"], fake.env)
    assert r.returncode == 2 and "'train.global_batch_size'" in r.stderr and "world size 8" in r.stderr
    assert fake.calls() == []


def test_exec_refuses_a_node_that_is_not_where_the_node_list_puts_it(fake):
    env = {**fake.env, "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURMD_NODENAME": "gpu07"}
    r = _run([sys.executable, "-m", "fastclr.slurm", "exec", "--", fake.probe], env)
    assert r.returncode == 2 and "SLURMD_NODENAME" in r.stderr and not fake.ranks()


# --------------------------------------------------------------------------------------------------------------- #
# The batch script, run with bash under the fake Slurm


def test_sbatch_header_is_read_by_sbatch_and_asks_for_requeue_and_the_signal():
    lines = open(SBATCH).read().splitlines()
    first_command = next(i for i, line in enumerate(lines[1:], 1) if line.strip() and not line.startswith("#"))
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    # sbatch stops reading #SBATCH lines at the first command: every directive must come before it.
    assert all(i < first_command for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    opts = dict(d.split("=", 1) if "=" in d else (d, None) for d in directives)
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time", "--requeue",
            "--signal", "--open-mode", "--output"} <= set(opts)
    assert opts["--signal"].startswith("USR1@")  # no "B:": the steps' processes (the ranks) get it
    assert opts["--open-mode"] == "append" and "%j" in opts["--output"]
    assert opts["--ntasks-per-node"] == opts["--gpus-per-node"]  # mode rank: one task per GPU
    assert subprocess.run(["bash", "-n", SBATCH]).returncode == 0


def test_sbatch_dry_run(fake):
    env = {**fake.env, "FASTCLR_SLURM_DRY_RUN": "1", "SLURM_JOB_NODELIST": "gpu[01-08]", "SLURM_NNODES": "8",
           "SLURM_GPUS_ON_NODE": "8"}
    r = _run(["bash", SBATCH, "--recipe", IMAGENET, *DATA, "train.epochs=1"], env)
    assert r.returncode == 0, r.stderr
    assert "".join(f"gpu0{i} slots=8\n" for i in range(1, 9)) in r.stdout
    assert "node 1 gpu02: ranks 8-15   <- this node" in r.stdout and "node 7 gpu08: ranks 56-63" in r.stdout
    assert "batch: global 4096 = micro 64 x accumulation 1 x world 64" in r.stdout
    assert "dry run: nothing started" in r.stdout and all(c["argv"][:2] == ["show", "node"] for c in fake.calls())


@pytest.mark.parametrize("probe_exit, script_exit", [(0, 0), (3, 0), (1, 1)])
def test_sbatch_runs_every_rank_through_srun(fake, probe_exit, script_exit):
    r = _run(["bash", SBATCH, "--script", fake.probe, "train.epochs=2"], {**fake.env, "PROBE_EXIT": str(probe_exit)})
    assert r.returncode == script_exit, r.stdout + r.stderr
    if probe_exit == 3:
        assert "checkpoint written (exit 3)" in r.stdout
    srun = [c for c in fake.calls() if c["prog"] == "srun"]
    assert "--ntasks-per-node=4" in srun[0]["argv"] and "--cpus-per-task=6" in srun[0]["argv"]
    ranks = fake.ranks()
    assert sorted(ranks) == list(range(8))
    port = str(default_master_port(JOB))
    for rank, seen in ranks.items():
        assert seen["RANK"] == str(rank) and seen["LOCAL_RANK"] == str(rank % 4) and seen["WORLD_SIZE"] == "8"
        assert seen["MASTER_ADDR"] == "gpu07" and seen["MASTER_PORT"] == port and seen["OMP_NUM_THREADS"] == "6"
        assert seen["CROSS_RANK"] == str(rank // 4)
        assert seen["argv"][:2] == ["--config", os.path.join(ROOT, "launchers", "configs", "default.yaml")]
        assert seen["argv"][2:] == ["train.epochs=2"]
        assert seen["usr1_blocked"]  # until the trainer's handler is in place an early USR1 waits, neither kills nor
        # is lost (Slurm sends its time-limit warning once)
    # exec, not a child: the process srun started is the trainer itself, so Slurm's signals land on it.
    assert sorted(s["pid"] for s in ranks.values()) == sorted(srun[1]["task_pids"])


def _start_holding_batch_shell(fake, **extra):
    release = fake.tmp / "release"
    env = {**fake.env, "FAKE_SRUN_HOLD": str(release), **extra}
    p = subprocess.Popen(["bash", SBATCH], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    deadline = time.time() + 30
    while not (fake.tmp / "release.ready").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    assert (fake.tmp / "release.ready").exists(), p.communicate()[0]
    return p, release


def test_batch_shell_forwards_usr1_to_srun_for_the_b_variant(fake):
    p, _ = _start_holding_batch_shell(fake)
    p.send_signal(signal.SIGUSR1)
    out = p.communicate(timeout=30)[0]
    assert p.returncode == 0, out  # fake srun exits 3 on USR1, like the ranks after their checkpoint
    assert {"prog": "srun", "signal": "SIGUSR1"} in fake.calls()


@pytest.mark.parametrize("step_rc, progress, requeued, script_rc", [
    (137, True, True, 0),    # a rank was killed after this start completed a checkpoint: another start resumes
    (4, True, True, 0),      # a rank lost its peers (collective timeout)
    (137, False, False, 137),  # no checkpoint since the start: requeueing would repeat the same failure
    (5, True, False, 5),     # the trainer's own report (a checkpoint it could not write): the operator's turn
    (1, True, False, 1),     # an exception in the trainer
    (2, True, False, 2),     # a bad config
])
def test_after_a_failed_start_the_batch_script_requeues_only_with_progress(fake, step_rc, progress, requeued,
                                                                            script_rc):
    ckpt = fake.tmp / "ckpt"
    env = {**fake.env, "FAKE_SRUN_RC": str(step_rc), **({"FAKE_SRUN_CKPT": str(ckpt)} if progress else {})}
    r = _run(["bash", SBATCH, "--script", fake.probe, f"checkpoint.dir={ckpt}"], env)
    assert r.returncode == script_rc, r.stdout + r.stderr
    requeues = [c["argv"] for c in fake.calls() if c["prog"] == "scontrol" and c["argv"][0] == "requeue"]
    assert requeues == ([["requeue", "Incomplete", str(JOB)]] if requeued else [])
    if requeued:
        assert "checkpoint step000000005 was completed in this start; requeueing" in r.stdout


def test_launch_command_bounds_the_wait_for_a_hung_rank_and_fixes_the_master():
    world = SlurmWorld.from_env(ENV_2x4, master_addr="10.1.2.3")
    cmd = launch_command(world, "r.yaml", [], "rank", wait_s=14.2)
    assert "--wait=15" in cmd and cmd[cmd.index("--master-addr") + 1] == "10.1.2.3"
    assert rank_env(SlurmWorld.from_env({**ENV_2x4, "SLURM_PROCID": "4", "SLURM_LOCALID": "0"},
                                        master_addr="10.1.2.3"))["MASTER_ADDR"] == "10.1.2.3"
    assert "--wait" not in " ".join(launch_command(world, "r.yaml", [], "rank"))


def test_node_address_uses_the_name_if_it_resolves_else_slurms_node_addr(fake, monkeypatch):
    monkeypatch.setenv("PATH", fake.env["PATH"])
    monkeypatch.setenv("FAKE_LOG", fake.env["FAKE_LOG"])
    assert node_address("localhost") == "localhost" and fake.calls() == []
    monkeypatch.setenv("FAKE_NODE_ADDR", "127.0.0.1")
    assert node_address("node1.invalid") == "127.0.0.1"  # the local cluster's node names resolve nowhere
    monkeypatch.setenv("FAKE_SCONTROL_RC", "1")
    with pytest.raises(SlurmError, match="'node1.invalid' does not resolve.*--master-addr"):
        node_address("node1.invalid")


# --------------------------------------------------------------------------------------------------------------- #
# DeepSpeed launcher mode, for real (CPU accelerator): SIGUSR1 to every process of the task, as slurmstepd sends it


def test_deepspeed_mode_survives_usr1_and_passes_exit_3_through(fake):
    pytest.importorskip("deepspeed")
    env = {**fake.env, "SLURM_JOB_NODELIST": "cpu[1-2]", "SLURMD_NODENAME": "cpu2", "SLURM_GPUS_ON_NODE": "2",
           "SLURM_NTASKS_PER_NODE": "1", "PROBE_WAIT_USR1": "1", "PROBE_EXIT": "3"}
    p = subprocess.Popen([sys.executable, "-m", "fastclr.slurm", "exec", "--mode", "deepspeed", "--gpus-per-node", "2",
                          "--", fake.probe, "--config", "r.yaml"], env=env, cwd=ROOT, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    probe = fake.tmp / "probe"
    deadline = time.time() + 60
    while len(list(probe.glob("rank-*.ready"))) < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGUSR1)  # runner, launch.py and both ranks
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 3, out  # without the ignored disposition the runner dies of the signal (138)
    ranks = fake.ranks()
    assert sorted(ranks) == [2, 3] and all(r["got_usr1"] for r in ranks.values())
    assert {r["LOCAL_RANK"] for r in ranks.values()} == {"0", "1"}
    assert all(r["WORLD_SIZE"] == "4" and r["MASTER_ADDR"] == "cpu1" for r in ranks.values())
    assert (fake.tmp / f"fastclr-{JOB}.hostfile").read_text() == "cpu1 slots=2\ncpu2 slots=2\n"


# --------------------------------------------------------------------------------------------------------------- #
# Submission


@pytest.fixture
def submit(fake, monkeypatch):
    monkeypatch.setenv("PATH", fake.env["PATH"])
    monkeypatch.setenv("FAKE_LOG", fake.env["FAKE_LOG"])
    spec = importlib.util.spec_from_file_location("fastclr_submit", SUBMIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_submit_dry_run_prints_the_arithmetic_and_the_sbatch_command(fake, submit, capsys):
    assert submit(["--recipe", IMAGENET, "--nodes", "8", "--gpus-per-node", "8", "--time", "24:00:00",
                   "--partition", "gpu", "--dry-run", *DATA, "train.epochs=200"]) == 0
    out = capsys.readouterr().out
    assert "global 4096 = micro 64 x accumulation 1 x world 64" in out
    assert "peak LR: 4.8 (linear: 0.3 x 4096/256)" in out
    line = shlex.split(out.split("sbatch command:\n")[1].splitlines()[0])  # quoted to paste into a shell
    assert line[0] == "sbatch" and {"--nodes=8", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=8",
                                    "--time=24:00:00", "--partition=gpu"} <= set(line)
    assert line[line.index(SBATCH) + 1:] == ["--recipe", IMAGENET, "--mode", "rank", *DATA, "train.epochs=200"]
    assert fake.calls() == []


def test_submit_refuses_a_batch_the_world_does_not_divide_before_sbatch(fake, submit, capsys):
    assert submit(["--recipe", IMAGENET, "--nodes", "3", "--gpus-per-node", "8", *DATA]) == 2
    err = capsys.readouterr().err
    assert "'train.global_batch_size'" in err and "4096" in err and "world size 24" in err
    assert fake.calls() == []


def test_submit_runs_sbatch(fake, submit, capfd):
    assert submit(["--recipe", IMAGENET, "--nodes", "2", "--gpus-per-node", "4", "--mode", "deepspeed",
                   "--account", "proj", *DATA, f"logging.dir={fake.tmp / 'run'}"]) == 0
    assert "Submitted batch job 4243" in capfd.readouterr().out
    (call,) = fake.calls()
    assert call["prog"] == "sbatch" and "--ntasks-per-node=1" in call["argv"] and "--account=proj" in call["argv"]
    assert "--cpus-per-task=32" in call["argv"]  # one launcher task holds its 4 ranks' 8 CPUs each
    assert f"--output={fake.tmp / 'run' / 'slurm-%j.out'}" in call["argv"] and (fake.tmp / "run").is_dir()


def test_submit_for_cpu_nodes_asks_for_no_gpus_and_hands_the_ranks_per_node_to_the_batch_script(fake, submit, capsys):
    assert submit(["--recipe", IMAGENET, "--nodes", "2", "--gpus-per-node", "4", "--cpu", "--cpus-per-task", "1",
                   "--dry-run", *DATA]) == 0
    line = capsys.readouterr().out.split("sbatch command:\n")[1].splitlines()[0].split()
    assert "--gpus-per-node=0" in line and "--ntasks-per-node=4" in line  # 0: a CPU partition has no gpu gres
    assert line[line.index(SBATCH) + 1:][:6] == ["--recipe", IMAGENET, "--mode", "rank", "--gpus-per-node", "4"]


# --------------------------------------------------------------------------------------------------------------- #
# Requeue


def test_requeue_calls_scontrol_with_the_job_id(fake, monkeypatch):
    monkeypatch.setenv("PATH", fake.env["PATH"])
    monkeypatch.setenv("FAKE_LOG", fake.env["FAKE_LOG"])
    assert requeue({"SLURM_JOB_ID": str(JOB)}) is True
    assert fake.calls() == [{"prog": "scontrol", "argv": ["requeue", "Incomplete", str(JOB)]}]


def test_requeue_reports_failure_without_raising(fake, monkeypatch):
    monkeypatch.setenv("PATH", fake.env["PATH"])
    monkeypatch.setenv("FAKE_LOG", fake.env["FAKE_LOG"])
    monkeypatch.setenv("FAKE_SCONTROL_RC", "1")
    assert requeue({"SLURM_JOB_ID": str(JOB)}) is False
    assert requeue({}) is False  # not under Slurm: nothing to call
    assert len(fake.calls()) == 1

    def missing(*args, **kwargs):
        raise FileNotFoundError("scontrol")

    def hung(*args, **kwargs):
        raise subprocess.TimeoutExpired("scontrol", 60)

    assert requeue({"SLURM_JOB_ID": "1"}, runner=missing) is False
    assert requeue({"SLURM_JOB_ID": "1"}, runner=hung) is False


def test_submit_chains_a_stage_after_the_job_that_writes_its_source(fake, submit, capsys, tmp_path):
    source = tmp_path / "run" / "checkpoints"  # pretraining (job 123) has not written it yet
    assert submit(["--task", "finetune", "--source", str(source), "--after", "123", "--nodes", "1",
                   "--gpus-per-node", "2", "--cpu", "--dry-run", "finetune.global_batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "does not exist yet (job 123 writes it)" in out and "task: finetune from" in out
    assert "global 64 = micro 32 x accumulation 1 x world 2" in out  # the stage's own batch section
    line = out.split("sbatch command:\n")[1].splitlines()[0].split()
    assert "--dependency=afterok:123" in line and "--job-name=fastclr-finetune-source-config" in line
    assert line[line.index(SBATCH) + 1:] == ["--task", "finetune", "--source", str(source), "--mode", "rank",
                                            "--gpus-per-node", "2", "finetune.global_batch_size=64"]
    assert fake.calls() == []


def test_submit_refuses_a_stage_it_cannot_run_naming_what_is_wrong(fake, submit, capsys, tmp_path):
    assert submit(["--task", "distill", "--source", str(tmp_path / "none.pt"), "--nodes", "1"]) == 2
    assert "does not exist (chain the job with --after JOBID" in capsys.readouterr().err
    assert submit(["--task", "finetune", "--source", str(tmp_path / "later"), "--after", "7", "--nodes", "1",
                   "--gpus-per-node", "2", "finetune.global_batch_size=63"]) == 2
    assert "'finetune.global_batch_size'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        submit(["--task", "linear", "--nodes", "1"])  # no --source
    assert "needs --source" in capsys.readouterr().err
    assert fake.calls() == []


def test_a_stage_runs_on_every_rank_through_the_stage_launcher():
    world = SlurmWorld(job_id=9, nodes=("cpu1", "cpu2"), gpus_per_node=2, node_rank=0, master_port=29500)
    cmd = launch_command(world, None, ["finetune.labels=1%"], task="finetune", source="/runs/a/checkpoints")
    assert cmd[cmd.index("--") + 1:] == [os.path.join(ROOT, "launchers", "stage.py"), "finetune",
                                         "/runs/a/checkpoints", "finetune.labels=1%"]
    with pytest.raises(SlurmError, match="needs a source"):
        launch_command(world, None, [], task="distill")
