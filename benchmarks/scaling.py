"""A scaling model of data-parallel SimCLR: bytes each rank moves per step, and the step time and efficiency they
imply from 1 to 64 nodes × 8 GPUs, checked against a measured 2-rank CPU run.

    PYTHONPATH=. python -m benchmarks.scaling [--step-ms 180 --per-gpu-batch 64 --inter-gbps 400 --intra-gbps 2400]

Per step, each of K ranks (per-rank batch b, embedding size d, P parameters, BN layers with C_l channels):

* gradient all-reduce of 4P bytes (fp32): a ring sends and receives 2(K−1)/K · 4P per rank;
* cross-replica negatives: all-gather of the 2b × d fp32 embeddings forward, the same volume reduce-scattered in
  backward: 2 · (K−1)/K · K · 2b · d · 4;
* global BN: per layer an all-gather of (count, mean, var) = (2C+1) fp32 forward and an all-reduce of 2C fp32
  backward — little volume, two latencies per layer;
* locally, DeepSpeed flattens the gradients into a bucket, scales and copies them back: 4P bytes at the copy rate
  (HBM on a GPU, default 1 TB/s effective; measured on this machine for the check).

Time of a collective of S bytes per rank: α·⌈log₂K⌉ + S/β, with β the per-GPU bandwidth of the slowest link the
collective crosses (NVLink within a node, the node's network share across nodes). fastclr all-reduces the gradient
buckets during the backward pass, so only the part of the all-reduce that outlasts backward (at least the last
bucket's) is exposed; the predicted step is compute + exposed communication and the efficiency is their ratio.
Weak scaling: the per-GPU batch stays fixed, the global batch grows with the nodes (4096 at 8 nodes × 8 × 64).

The check: α (the 4 KiB all-reduce) and β (the slope from 4 to 16 MiB) of gloo between 2 processes on this machine;
the model's all-reduce time for the 2-rank breakdown run's model is compared with the ``comm`` phase the trainer
measured (the trainer bills waiting for the slower rank to a separate ``wait`` phase). What the model leaves out is
DeepSpeed's per-call work around the collective (bucketing, Python, gloo's per-call set-up).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics

import torch

from .common import RESULTS, Recorder, time_calls

NODES = (1, 2, 4, 8, 16, 32, 64)
GPUS_PER_NODE = 8


def model_comm(model: torch.nn.Module, emb_dim: int) -> dict:
    """Parameter count, BN channel counts and embedding size of a SimCLR model."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bn = [m.num_features for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return {"params": params, "bn_channels": bn, "emb_dim": emb_dim}


def collective_s(nbytes: float, ranks: int, alpha_s: float, beta_bps: float) -> float:
    if ranks <= 1:
        return 0.0
    return alpha_s * math.ceil(math.log2(ranks)) + nbytes / beta_bps


def step_bytes(mc: dict, per_rank_batch: int, ranks: int) -> dict:
    """Bytes each rank sends per step, by kind."""
    k = ranks
    if k <= 1:
        return {"grad_allreduce": 0.0, "embedding_gather": 0.0, "bn_stats": 0.0}
    grads = 2 * (k - 1) / k * 4 * mc["params"]
    emb = 2 * (k - 1) / k * k * 2 * per_rank_batch * mc["emb_dim"] * 4
    bn = sum((k - 1) * (2 * c + 1) * 4 + 2 * (k - 1) / k * 2 * c * 4 for c in mc["bn_channels"])
    return {"grad_allreduce": grads, "embedding_gather": emb, "bn_stats": bn}


BACKWARD_SHARE = 2 / 3
"""Backward's share of a step's compute (twice the forward's FLOPs): the time the gradient all-reduce can hide in."""
BUCKET_BYTES = 25 * 2**20


def predict(mc: dict, *, compute_s: float, per_rank_batch: int, nodes: int, gpus_per_node: int, alpha_s: float,
            intra_bps: float, inter_bps: float, copy_bps: float = 1e12, overlap: bool = True) -> dict:
    """The step of K = nodes × GPUs ranks. With ``overlap`` (fastclr's default) the gradient all-reduce runs during
    backward: only what exceeds backward, or at least the last bucket's all-reduce, is exposed. The embedding
    gather and the BN statistics sit on the critical path either way."""
    k = nodes * gpus_per_node
    beta = intra_bps if nodes == 1 else inter_bps
    b = step_bytes(mc, per_rank_batch, k)
    grads = collective_s(b["grad_allreduce"], k, alpha_s, beta)
    if overlap and k > 1:
        last = collective_s(b["grad_allreduce"] * min(1.0, BUCKET_BYTES / (4 * mc["params"])), k, alpha_s, beta)
        grads = max(grads - BACKWARD_SHARE * compute_s, last)
    comm = (grads + (4 * mc["params"] / copy_bps if k > 1 else 0.0)
            + collective_s(b["embedding_gather"], k, alpha_s, beta)
            + sum(2 * collective_s(0, k, alpha_s, beta) for _ in mc["bn_channels"]) + b["bn_stats"] / beta)
    step = compute_s + comm
    return {"nodes": nodes, "gpus": k, "global_batch": k * per_rank_batch, "bytes_per_rank": sum(b.values()),
            **{f"bytes_{n}": v for n, v in b.items()}, "comm_s": comm, "step_s": step,
            "efficiency": compute_s / step, "images_per_s": k * per_rank_batch / step}


# ----------------------------------------------------------------------------------------------------------------- #
def _allreduce_worker(rank: int, port: int, sizes: list[int], repeats: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    out = {}
    for n in sizes:
        x = torch.ones(n // 4)
        out[n] = statistics.median(time_calls(lambda: dist.all_reduce(x), repeats=repeats, warmup=2,
                                              setup=dist.barrier))
    # DeepSpeed's all-reduce also flattens the gradients into a bucket, scales it by 1/K and copies it back: three
    # local passes over the bytes, timed here on 100 tensors of 16 MiB in all.
    grads = [torch.randn((16 << 20) // 4 // 100) for _ in range(100)]

    def flatten_scale_copy():
        flat = torch.cat([g.view(-1) for g in grads])
        flat.div_(2)
        torch._foreach_copy_(grads, list(flat.split([g.numel() for g in grads])))

    out["copy_bytes_per_s"] = (16 << 20) / statistics.median(time_calls(flatten_scale_copy, repeats=repeats, warmup=0))
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def fit_gloo(sizes=(4096, 65536, 1 << 20, 4 << 20, 16 << 20), repeats: int = 7):
    """(α seconds, β bytes/s, {bytes: seconds}, local copy bytes/s) of a 2-process gloo all-reduce on this machine;
    the copy rate is that of the flatten/scale/unflatten around it."""
    import torch.multiprocessing as mp

    from fastclr.runtime import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, port, list(sizes), repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    times = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    copy_rate = times.pop("copy_bytes_per_s")
    # α from the smallest message (pure latency), β from the slope between the two largest (pure bandwidth): a
    # least-squares line through all of them lets the large messages' noise swamp the intercept.
    sizes = sorted(times)
    alpha = times[sizes[0]]
    slope = (times[sizes[-1]] - times[sizes[-2]]) / (sizes[-1] - sizes[-2])
    return alpha, 1.0 / slope, times, copy_rate


def run(rec: Recorder, *, quick: bool = False, smoke: bool = False, breakdown: dict | None = None,
        step_s: float | None = None, per_gpu_batch: int = 64, inter_gbps: float = 400.0,
        intra_gbps: float = 2400.0, alpha_us: float = 10.0, model: str = "resnet50") -> list[dict]:
    """The table for ResNet-50 SimCLR (or ``model``) and, given a breakdown result, the check against it."""
    from .flops import build

    rows = []
    mc = model_comm(build(model, cifar_stem=False), 128)
    device = rec.base["device_name"]
    if step_s is None:
        step_s = 0.0
    shape = f"{model}, {per_gpu_batch}/GPU, {inter_gbps:g} Gb/s per GPU across nodes, {intra_gbps:g} Gb/s within"
    table = []
    for n in NODES:
        p = predict(mc, compute_s=step_s, per_rank_batch=per_gpu_batch, nodes=n, gpus_per_node=GPUS_PER_NODE,
                    alpha_s=alpha_us * 1e-6, intra_bps=intra_gbps / 8 * 1e9, inter_bps=inter_gbps / 8 * 1e9)
        table.append(p)
        rows.append(rec.add(benchmark="scaling", group="scaling model", variant=f"{n} nodes x {GPUS_PER_NODE}",
                            role="measure", shape=shape, dtype="-", unit="efficiency", value=p["efficiency"],
                            predicted=p, compute_s=step_s, compute_from=device))
    # The check is of the gloo path (a CPU run); on GPUs the breakdown's comm phase is NCCL's, which this fit is not.
    if breakdown is not None and breakdown["ranks"] >= 2 and not torch.cuda.is_available():
        alpha, beta, samples, copy_rate = fit_gloo(repeats=3 if smoke else 7)
        cfg = breakdown["cfg"]
        from fastclr.models import build_model

        bmc = model_comm(build_model(cfg.model), cfg.model.proj_out_dim)
        k = breakdown["ranks"]
        grad_bytes = 4 * bmc["params"]  # the 2-process fit already holds the ring's factor for K = 2
        predicted_ms = (alpha + grad_bytes / beta + grad_bytes / copy_rate) * 1e3
        measured_ms = breakdown["phases"]["comm"]
        shape2 = f"{cfg.model.arch} width {cfg.model.width_mult:g}: {bmc['params'] / 1e6:.2f}M params, gloo"
        rows.append(rec.add(benchmark="scaling", group=f"scaling check {k} gloo ranks", variant="measured all-reduce",
                            role="measure", shape=shape2, dtype="float32", unit="ms/step", value=measured_ms))
        rows.append(rec.add(benchmark="scaling", group=f"scaling check {k} gloo ranks",
                            variant="predicted all-reduce", role="measure", shape=shape2, dtype="float32",
                            unit="ms/step", value=predicted_ms, alpha_us=alpha * 1e6, beta_gbps=beta * 8 / 1e9,
                            copy_gbps=copy_rate * 8 / 1e9, grad_bytes=grad_bytes,
                            fit_samples={str(s): t for s, t in samples.items()}))
    return rows


def table_markdown(rows: list[dict]) -> str:
    model_rows = [r for r in rows if r["group"] == "scaling model"]
    if not model_rows:
        return ""
    out = ["| nodes × GPUs | global batch | MB sent per GPU per step | comm ms | step ms | efficiency |",
           "|---|---|---|---|---|---|"]
    for r in model_rows:
        p = r["predicted"]
        out.append(f"| {p['nodes']} × {GPUS_PER_NODE} | {p['global_batch']} | {p['bytes_per_rank'] / 1e6:.1f} | "
                   f"{p['comm_s'] * 1e3:.1f} | {p['step_s'] * 1e3:.1f} | {p['efficiency'] * 100:.1f}% |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model_rows = [r["predicted"] for r in rows if r["group"] == "scaling model"]
    if not model_rows:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    gpus = [p["gpus"] for p in model_rows]
    a.plot(gpus, [p["images_per_s"] for p in model_rows], marker="o", label="predicted")
    a.plot(gpus, [model_rows[0]["images_per_s"] * g / gpus[0] for g in gpus], ls="--", label="linear")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("GPUs")
    a.set_ylabel("images/s")
    a.legend()
    b.plot(gpus, [p["efficiency"] * 100 for p in model_rows], marker="o")
    b.set_xscale("log", base=2)
    b.set_xlabel("GPUs")
    b.set_ylabel("efficiency %")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, required=True, help="measured single-GPU step time at --per-gpu-batch")
    p.add_argument("--per-gpu-batch", type=int, default=64)
    p.add_argument("--inter-gbps", type=float, default=400.0, help="network Gb/s per GPU between nodes")
    p.add_argument("--intra-gbps", type=float, default=2400.0, help="NVLink Gb/s per GPU within a node")
    p.add_argument("--alpha-us", type=float, default=10.0, help="latency per collective hop, µs")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--out", default=os.path.join(RESULTS, "scaling.jsonl"))
    args = p.parse_args(argv)
    rows = run(Recorder(args.out, quiet=True), step_s=args.step_ms / 1e3, per_gpu_batch=args.per_gpu_batch,
               inter_gbps=args.inter_gbps, intra_gbps=args.intra_gbps, alpha_us=args.alpha_us, model=args.model)
    print(table_markdown(rows))
    plot(rows, os.path.splitext(args.out)[0] + ".png")


if __name__ == "__main__":
    main()
