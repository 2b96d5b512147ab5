"""Triton code for the regions the passes create: hand-written kernels with their launch
helpers (for now the 2-bit step activations of approx_bp).

Imported only behind functions by ``rewrite`` (the GPU path of its custom ops), so that
``import rewrite`` works on machines without Triton.
"""
