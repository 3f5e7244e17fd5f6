"""The methods a text model serves (online and as jobs), from the method table's names.

VANILLA_GRADIENT on a text model is gradient x embedding, SMOOTHGRAD averages the gradient over
noisy embeddings, INTEGRATED_GRADIENTS integrates from the zero or pad-token embedding
(workers/kernels/text_gradients.py). Every other method (CAM, perturbation, the SmoothGrad
variants) is refused for text models, naming these. No torch import: the config and CLI read it.
"""
from workers.methods import TEXT_METHODS  # noqa: F401  (the table's rows with modality TEXT)

TEXT_BASELINES: tuple[str, ...] = ("zero", "pad_token")
