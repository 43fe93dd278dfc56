"""SAELens itself loads an SAE saved by saex and computes the same codes and reconstructions."""

import pytest
import torch

from saex.sae import SAE, SAEConfig
from saex.sae.io import save_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (the `interop` extra: pip install 'saex[interop]')")


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_saelens_loads_saex_saes(arch, tmp_path):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=48, architecture=arch, k=6))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.2)
        for p in sae.arch.parameters():
            p.uniform_(0.05, 0.2)
        if arch == "batchtopk":
            sae.arch.threshold.fill_(0.1)
    sae.eval()
    save_sae(sae, tmp_path / arch, {"model": "minilm", "hook": "blocks.3.hook_resid_post"})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch), device="cpu")
    x = torch.randn(20, 16)
    ours_f = sae.encode(x).dense()
    their_f = theirs.encode(x)
    assert (their_f != 0).sum() > 0
    torch.testing.assert_close(their_f, ours_f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs.decode(their_f), sae(x), atol=1e-5, rtol=1e-5)
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
