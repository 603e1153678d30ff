"""On-disk format: safetensors reading/writing (streamed, validated, atomic) and ComfyUI quant metadata."""
