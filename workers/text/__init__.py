"""Text classifiers: their config, tokenizer, demo model, embedding-substituted forward and batch pipeline.

A text model takes token ids and an attention mask, `model(ids, attention_mask) -> logits`, both
`# (N, L)` int64, and has one embedding module (named in the config) whose output `# (N, L, D)` is
where attributions are taken: per-token scores are the attribution summed over D.
"""
