"""Triton kernels of fastdelta, installed as the package `fastdelta.kernels`."""
