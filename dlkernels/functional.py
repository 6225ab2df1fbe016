"""torch.nn.functional-style entry points, with torch's signatures, defaults and errors: the
``FUNCTIONAL`` names of every family's op module (dlkernels/ops/<family>.py), gathered here.

    leaky_relu(input, negative_slope=0.01, inplace=False)    prelu(input, weight)
    batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5)
    batch_norm_act(..., activation="leaky_relu", negative_slope=0.01, prelu_weight=None, dropout=0.0, *,
                   generator=None, seed=None)
"""

from __future__ import annotations

from dlkernels.ops import FAMILIES, family_module

__all__: list[str] = []
for _family in FAMILIES:
    _module = family_module(_family)
    for _name in getattr(_module, "FUNCTIONAL", ()):
        globals()[_name] = getattr(_module, _name)
        __all__.append(_name)
__all__.sort()
del _family, _module, _name
