"""Plain-torch implementations: the specification every kernel is tested against, and the
fallback backend. One module per family, with the same function names as the kernels."""
