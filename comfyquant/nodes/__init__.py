"""comfyquant.nodes."""
