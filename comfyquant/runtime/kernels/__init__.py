"""comfyquant.runtime.kernels."""
