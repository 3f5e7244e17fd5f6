"""Faithfulness metrics for saliency maps: pure functions over a model, inputs, maps and targets.

Modules (each metric's paper definition is in its module's docstring; docs/faithfulness.md says
what every number means and what it does not prove):
    perturbation    deletion / insertion curves and AUC, against a random order (Petsiuk et al. 2018)
    randomization   model-randomization sanity check, cascading and independent (Adebayo et al. 2018)
    localisation    pointing game, top-k IoU, energy in box
    completeness    IG completeness-error distribution (Sundararajan et al. 2017)
    stability       rank correlation of maps under noise / shift / brightness
    discrimination  mean pairwise rank correlation of the top-k classes' maps
    aggregate       mean and seeded bootstrap confidence interval of per-item values
    similarity      batched Spearman and SSIM between stacks of maps
    attribute       the service's kernels as `Attribute` callables (model, inputs, targets) -> maps
Inputs are tensors: inputs `# (N, C, H, W)` in model space on the model's device, maps
`# (N, H, W)`, targets `# (N,)`. Results are plain dataclasses of numpy arrays and floats.
"""
from workers.evaluation.aggregate import Aggregate, MetricResult, aggregate, metric
from workers.evaluation.attribute import cam_attribute, gradient_attribute
from workers.evaluation.completeness import CompletenessResult, completeness_distribution
from workers.evaluation.discrimination import DiscriminationResult, class_discrimination
from workers.evaluation.localisation import LocalisationResult, localisation
from workers.evaluation.perturbation import CurveConfig, PerturbationResult, perturbation_curves
from workers.evaluation.randomization import (Attribute, RandomizationResult, data_randomization_check,
                                              randomization_check)
from workers.evaluation.stability import Augmentation, StabilityResult, stability

__all__ = [
    "Aggregate", "MetricResult", "aggregate", "metric", "cam_attribute", "gradient_attribute",
    "CompletenessResult", "completeness_distribution", "DiscriminationResult", "class_discrimination",
    "LocalisationResult", "localisation", "CurveConfig", "PerturbationResult", "perturbation_curves",
    "Attribute", "RandomizationResult", "data_randomization_check", "randomization_check", "Augmentation",
    "StabilityResult", "stability",
]
