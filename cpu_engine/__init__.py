"""The optional CPU engine: convolutions and normalisations on every core through numpy's BLAS
and C loops (see README.md). Only runtime.device imports it."""

from cpu_engine.functions import KernelsUnavailable, accelerate, kernels

__all__ = ['KernelsUnavailable', 'accelerate', 'kernels']
