"""fastpeft's Triton kernels, installed as ``fastpeft.kernels``.

Each module holds private ``@triton.jit`` kernels and plain launchers (check shapes, allocate, launch). Nothing here
owns autograd: ``fastpeft.functional`` does. Importing this package requires Triton; ``fastpeft`` itself never
imports it eagerly.
"""
