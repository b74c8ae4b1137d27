"""The method math: the registry of methods, sparsifiers, masks, selection and kernels."""
