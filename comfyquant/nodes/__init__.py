"""comfyquant's ComfyUI node pack ("Enable INT8 on MODEL", quantized loader, save, digits conditioning).

ComfyUI loads it through the entry file ``comfyquant install-nodes`` writes into ``custom_nodes/comfyquant/``
(the repository root's ``__init__.py`` when the repository is cloned there); that file imports the two
mappings below. Node classes live in ``definitions``; the engine in ``adapter``, ``loader``, ``save``, ``ops``.
"""

from comfyquant.nodes.definitions import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
