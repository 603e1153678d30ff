"""Automatic per-layer precision: choose every layer's format to meet a size or quality budget.

``parse_budget`` reads ``--budget``; ``CandidatePolicy`` derives the candidate formats from the registry;
``layer_sensitivity`` measures a layer's output error under each candidate from its calibration statistics;
``Frontier`` solves the multiple-choice knapsack; ``plan_precision`` ties them together (with a ``Probe`` to
weigh layers by how far their error propagates end to end) and returns an :class:`AutoPlan`.
"""

from comfyquant.autoprec.budget import Budget, parse_budget
from comfyquant.autoprec.candidates import KEEP, CandidatePolicy
from comfyquant.autoprec.plan import AUTO, AutoConfig, LayerSource, plan_precision
from comfyquant.autoprec.probe import Probe
from comfyquant.autoprec.result import AutoPlan, LayerChoice
from comfyquant.autoprec.sensitivity import LayerSensitivity, Option, layer_sensitivity
from comfyquant.autoprec.solver import Frontier

__all__ = [
    "AUTO",
    "KEEP",
    "AutoConfig",
    "AutoPlan",
    "Budget",
    "CandidatePolicy",
    "Frontier",
    "LayerChoice",
    "LayerSensitivity",
    "LayerSource",
    "Option",
    "Probe",
    "layer_sensitivity",
    "parse_budget",
    "plan_precision",
]
