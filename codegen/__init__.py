"""Triton code for the regions the passes create: kernels, templates, launch helpers.

Imported only behind functions by ``rewrite`` (the GPU path of its custom ops), so that
``import rewrite`` works on machines without Triton.
"""
