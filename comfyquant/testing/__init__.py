"""Test and benchmark fixtures: key layouts of real architectures, synthetic checkpoints, the ComfyUI fetch.

Nothing in the converter or runtime imports this package. Make a synthetic checkpoint of a real architecture
(real key names and shapes, heavy-tailed random weights with outlier channels) with::

    python -m comfyquant.testing --arch flux --size full -o flux.safetensors
"""
