"""Triton kernels (one module per kernel), their PyTorch reference ops, and dispatch.py, which alone picks between them."""
