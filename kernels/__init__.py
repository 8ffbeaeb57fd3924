"""Triton kernels and their launchers, installed as ``posttrain.kernels``. No autograd here: see posttrain.ops."""
