"""The ``fla`` backend (flash-linear-attention's Triton kernels, CUDA only) of retnet, gla,
deltanet and gated_deltanet against the zoo's own chunkwise form: outputs and gradients. Skipped
without CUDA and fla; on the CPU the registry reports the backend unavailable (tested in
test_registry)."""

import pytest
import torch

import zoo


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["retnet", "gla", "deltanet", "gated_deltanet"])
def test_fla_backend_matches_the_torch_backend(name):
    pytest.importorskip("fla")
    torch.manual_seed(0)
    ref = zoo.build_mixer(name, 128, backend="torch").cuda()
    fast = zoo.build_mixer(name, 128, backend="fla").cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 300, 128, device="cuda", requires_grad=True)
    g = torch.randn(2, 300, 128, device="cuda")
    y_ref, y_fast = ref(x), fast(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=2e-3, atol=2e-3)
    (a,) = torch.autograd.grad(y_fast, x, g)
    (b,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-3)
