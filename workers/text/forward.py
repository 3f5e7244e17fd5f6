"""A text model's forward with its embedding output replaced: the function the text kernels differentiate.

`TextForward.embed(ids)` runs the embedding module alone, `# (N, L) -> (N, L, D)`;
`TextForward.logits(embeds, ids, mask)` runs the whole model with the embedding module's output
replaced by `embeds` (noisy copies, points on an integration path), so gradients are taken with
respect to the embeddings. Two ways, picked when the model loads:

- a Python module (the demo, eager models) keeps one forward hook on the embedding module that
  returns the replacement set by the calling thread (thread-local), so concurrent batches on a
  replica never see each other's embeddings;
- a TorchScript module takes no hooks, so its embedding (an `nn.Embedding` without max_norm)
  gets, for one forward, a weight made of the replacement rows and ids that pick them position by
  position (`ids' = offset + arange(N*L)`). The swap holds a per-model lock for the forward only
  (the graph keeps the rows, so the backward runs unlocked). Such a model must read its ids only
  through the embedding module (its other inputs are the attention mask).
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor, nn

from workers.errors import ModelLoadError


class TextForward:
    """The embedding-level view of one loaded text model."""

    def __init__(self, module: nn.Module, embedding: str, model_name: str = ""):
        modules = dict(module.named_modules())
        if embedding not in modules:
            near = [n for n, m in modules.items() if n and ("emb" in n.lower() or isinstance(m, nn.Embedding)
                                                          or getattr(m, "original_name", "") == "Embedding")][:8]
            raise ModelLoadError(f"model {model_name!r}: no embedding module {embedding!r}; embedding-like modules: "
                                 f"{', '.join(near) or '(none)'}; set text.embedding to its path")
        self.module, self.embedding_name = module, embedding
        self.embedding = modules[embedding]
        self.scripted = isinstance(module, torch.jit.ScriptModule)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._hook = None
        if self.scripted:
            self._check_scripted_embedding(model_name)
        else:
            self._hook = self.embedding.register_forward_hook(self._replace)

    def _check_scripted_embedding(self, model_name: str) -> None:
        emb = self.embedding
        if getattr(emb, "original_name", "") != "Embedding" or not isinstance(getattr(emb, "weight", None), Tensor):
            raise ModelLoadError(f"model {model_name!r}: the TorchScript module's {self.embedding_name!r} is not an "
                                 "nn.Embedding; a scripted text model's embedding must be one (its output is "
                                 "replaced through its weight), or load the model as Python code")
        if getattr(emb, "max_norm", None) is not None:
            raise ModelLoadError(f"model {model_name!r}: embedding {self.embedding_name!r} has max_norm, which "
                                 "rewrites its weight on every lookup; it cannot be explained at the embedding")

    def _replace(self, _module, _args, output):
        embeds = getattr(self._local, "embeds", None)
        if embeds is None:
            return None
        if not isinstance(output, Tensor) or output.shape != embeds.shape:
            raise RuntimeError(f"embedding output {getattr(output, 'shape', output)} does not match the "
                               f"replacement {tuple(embeds.shape)}")
        return embeds.to(output.dtype)

    def embed(self, ids: Tensor) -> Tensor:
        """The embedding module's output `# (N, L, D)` for ids `# (N, L)`."""
        if not self.scripted:
            return self.embedding(ids)
        with self._lock:  # never during another thread's weight swap
            return self.embedding(ids)

    def plain(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Logits `# (N, K)` of the model as it is, on ids and mask `# (N, L)` (its predictions)."""
        if not self.scripted:
            return self.module(ids, mask)
        with self._lock:  # a scripted model's embedding weight is swapped while `logits` runs
            return self.module(ids, mask)

    def logits(self, embeds: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """Logits `# (N, K)` of the model on ids `# (N, L)` and mask `# (N, L)`, with the embedding
        output replaced by `embeds` `# (N, L, D)` (differentiable in `embeds`)."""
        if not self.scripted:
            self._local.embeds = embeds
            try:
                return self.module(ids, mask)
            finally:
                self._local.embeds = None
        n, length, dim = embeds.shape
        padding = self.embedding.padding_idx
        offset = 0 if padding is None else int(padding) + 1  # the padding row's gradient is zeroed: skip it
        rows = embeds.reshape(n * length, dim)
        weight = torch.cat([rows.new_zeros((offset, dim)), rows]) if offset else rows
        positions = (torch.arange(n * length, device=ids.device) + offset).view(n, length)
        with self._lock:
            original = self.embedding.weight
            self.embedding.weight = weight
            try:
                return self.module(positions, mask)
            finally:
                self.embedding.weight = original

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
