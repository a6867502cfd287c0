"""Launch configurations of the NT-Xent kernels (kernels/ntxent.py), with the reason for each limit.

Kept apart from the kernels so that what was measured about them reads in one place: the table is what the
autotuner may pick from, and tests/kernels/test_ntxent_aot.py compiles every entry for sm_80 and sm_90.
"""
import torch

# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel, operand width in bits (16: bf16/fp16
# operands on the tensor cores; 32: fp32 operands, dots as tf32x3) and BLOCK_D. Each one compiles for sm_80 and
# sm_90 within the target's shared memory (163 / 227 KB) and without a register spill: tests/kernels/
# test_ntxent_aot.py compiles every entry ahead of time with Triton's own ptxas and fails on any that does not
# (``python -m kernels.aot`` prints the resources). Chosen from ahead-of-time sweeps over tile shapes, warps and
# stages; the autotuner picks among a key's entries at run time. fp32 stops at BLOCK_D = 128: at 256 every tf32x3
# tile shape tried spills (16x32 to 128x64, 4 or 8 warps, 1-3 stages; the column gradient also needs 320-642 KB of
# shared memory), so fp32 embeddings wider than 128 are refused here and go to the PyTorch ``tiled`` loss.
# "cols" tiles are (anchors per inner step, columns per program).
CONFIGS = {
    "fwd": {16: {64: [(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3)],
                 128: [(128, 64, 8, 3), (64, 128, 8, 3), (64, 64, 8, 3)],
                 256: [(128, 64, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3)]},
            32: {64: [(64, 32, 4, 2), (32, 64, 8, 2)],
                 128: [(32, 64, 8, 2), (64, 16, 8, 2)]}},
    "rows": {16: {64: [(128, 64, 8, 3), (64, 64, 4, 3), (32, 64, 8, 3)],
                  128: [(64, 128, 8, 3), (64, 64, 8, 3), (32, 64, 8, 3)],
                  256: [(32, 32, 8, 3), (32, 32, 4, 3)]},
             32: {64: [(32, 64, 8, 2), (32, 32, 8, 2)],
                  128: [(16, 64, 8, 2), (16, 32, 8, 2)]}},
    "cols": {16: {64: [(64, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
                  128: [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 3)],
                  256: [(64, 32, 8, 2)]},
             32: {64: [(64, 32, 8, 2), (32, 64, 8, 1)],
                  128: [(64, 16, 8, 2), (32, 16, 8, 2)]}},
}
# Widest embedding the kernels take, by operand bits: a block of anchors and its fp32 gradient accumulator keep the
# whole row in registers (BLOCK_D = next power of two ≥ d). SimCLR projection heads are 128 wide.
MAX_D = {bits: max(by_d) for bits, by_d in CONFIGS["fwd"].items()}


def operand_bits(dtype: torch.dtype) -> int:
    """16 for bf16/fp16 operands, 32 for fp32 (the tables' first key)."""
    return 32 if dtype == torch.float32 else 16
