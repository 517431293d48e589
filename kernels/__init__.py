"""fastff.kernels: one folder per op family, each with a torch reference, a numba (CPU) and a
Triton (CUDA) path behind one launcher signature, and the custom ops that dispatch to them."""
