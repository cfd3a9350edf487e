"""Benchmarks and the GPU check: tooling, not shipped in the wheel; run from a source checkout's root.

``python -m benchmarks.ntxent`` (fused NT-Xent vs the naive loss), ``python -m benchmarks.loader``
(streaming loader vs nibabel and a stock WebDataset pipeline), ``python -m benchmarks.pretrain_step``
(one pretraining step under the engine vs a plain PyTorch loop), ``python -m benchmarks.gpu_check``
(the CUDA correctness checks of the kernels against the fp64 reference in
``tests/kernels/ntxent_reference.py``, then the GPU half of the NT-Xent benchmark). Each prints
ratios against a baseline measured in the same run; nothing here is a timed assertion.
"""
