"""GPU-only parts of the engine (Triton kernels, CUDA-graph decode); worker process.

Imported lazily, only when the engine runs on a CUDA device: the CPU path needs neither
CUDA nor Triton.
"""
