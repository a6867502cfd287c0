"""Triton kernels of fastclr: tensors in, tensors out (installed as ``fastclr_kernels``; never imports fastclr).

Modules are imported explicitly (``from fastclr_kernels import ntxent``) so that importing this package does not
import Triton.
"""
