"""Attribution kernels: pure functions of (model, batch, params) -> tensors."""
