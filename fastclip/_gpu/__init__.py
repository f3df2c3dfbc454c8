"""GPU route: CUDA kernels (kernels.cu) launched through CuPy on CuPy arrays and CUDA tensors."""
