"""comfyquant.runtime.kernels: the kernel-kind table and its backends (importing the package registers the
built-in kinds)."""

from comfyquant.runtime.kernels import builtin as _builtin  # noqa: F401
