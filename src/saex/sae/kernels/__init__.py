"""Sparse kernels of the hot path: every cost but the encoder GEMM scales with the kept latents, not d_sae.

Codes are kept entries (a value and a latent index each), grouped in bags: a code in top-k form
([B, K]) is B bags of K entries, JumpReLU's rows and Matryoshka's (row, latent group) pairs are bags of
any size. Both weight matrices are latent-major ([S, D] in memory), so three primitives serve the
decoder and the encoder alike:

- `decode(W_SD, values, indices, offsets)`: each bag's weighted sum of the rows it selects (the
  decoder forward, and the encoder's input gradient);
- `scatter_rows(X, values, indices, rows, S)`: each row of X added, weighted, into the latents its
  entries selected (the decoder's and the encoder's weight gradients), with each latent's sum of
  values (the encoder bias gradient);
- the gradient of `decode` with respect to the values (a dot product per entry).

Two backends give the same numbers: Triton kernels on CUDA tensors (`triton_ops`), and a vectorised
torch path (embedding bags and their backward kernels) everywhere else (`torch_ops`). `SAEX_KERNELS=torch`
forces the torch path."""

from saex.sae.kernels.dispatch import backend, decode
from saex.sae.kernels.encode import sparse_encode, topk_encode

__all__ = ["backend", "decode", "sparse_encode", "topk_encode"]
