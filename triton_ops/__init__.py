"""Triton kernels and launchers, one module per kernel family (see DESIGN.md).

Import-light on purpose: importing this package loads neither torch nor triton, and
no module here touches CUDA state at import time. ``_aot`` compiles every kernel ahead of
time for sm_80/sm_90 without a GPU; the family modules also run under the Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors).
"""
