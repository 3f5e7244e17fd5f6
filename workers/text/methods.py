"""The methods a text model serves (online and as jobs), from the method table's names.

VANILLA_GRADIENT on a text model is gradient x embedding, SMOOTHGRAD averages the gradient over
noisy embeddings, INTEGRATED_GRADIENTS integrates from the zero or pad-token embedding
(workers/kernels/text_gradients.py). Every other method (CAM, perturbation, the SmoothGrad
variants) is refused for text models, naming these. No torch import: the config and CLI read it.
"""
TEXT_METHODS: tuple[str, ...] = ("vanilla", "smoothgrad", "integrated_gradients")
TEXT_BASELINES: tuple[str, ...] = ("zero", "pad_token")
