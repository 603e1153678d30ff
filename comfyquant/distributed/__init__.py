"""Conversion and calibration across processes and GPUs with ``torch.distributed``.

A thin driver around the single-process pipeline: :class:`DistConfig` says which rank this process is (the
CLI builds it from torchrun's variables), :class:`Session` joins the job and ends it on every rank when one
fails, :mod:`assign` shares layers out, :mod:`transport` streams finished tensors to rank 0, which writes
the one output file in order. ``convert_distributed`` and ``calibrate_to_file_distributed`` are the entry
points (``torchrun --nproc-per-node N -m comfyquant convert|calibrate ...``).
"""

from comfyquant.distributed.config import DistConfig, from_torchrun_env
from comfyquant.distributed.session import PeerLost, Session

__all__ = ["DistConfig", "PeerLost", "Session", "from_torchrun_env"]
