"""Sparse kernels of the hot path: every cost but the encoder GEMM scales with k, not with d_sae.

Codes stay in top-k form (values [B, K], indices [B, K]) and the weights are latent-major ([S, D] in
memory, W_dec and W_enc alike), so three primitives serve the decoder and the encoder:

- `decode(W_SD, values, indices)`: sum of the selected rows, weighted (the decoder forward, and the
  encoder's input gradient);
- `scatter_rows(X_BD, values, indices, S)`: each row of X added, weighted, into the rows it selected
  (the decoder's and the encoder's weight gradients);
- the gradient of `decode` with respect to the values (a dot product per selected row).

Two backends give the same numbers: Triton kernels on CUDA tensors (`triton_ops`), and a vectorised
torch path (embedding bags and a sparse product) everywhere else (`torch_ops`). `SAEX_KERNELS=torch`
forces the torch path."""

from saex.sae.kernels.dispatch import backend, decode
from saex.sae.kernels.encode import sparse_encode, topk_encode

__all__ = ["backend", "decode", "sparse_encode", "topk_encode"]
