"""Fused kernels for mri-ssl: the NT-Xent contrastive loss (Triton on GPUs, chunked PyTorch on CPUs)."""

from kernels.ntxent import NTXentLoss, nt_xent

__all__ = ["NTXentLoss", "nt_xent"]
