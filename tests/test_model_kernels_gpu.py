"""One whole training step of MegalodonLM with the Triton kernels against the PyTorch path (GPU only).

The same weights and tokens go through ``backend="triton"`` and ``backend="torch"``; the loss and
every parameter gradient must agree. The two paths round differently, so the bounds follow the
dtype: under bf16 autocast each path rounds its matmul inputs to bf16 (unit roundoff 2^-8 = 3.9e-3)
on its own schedule, and the differences of ~8 layers of such roundings reach ~1e-2 relative in a
gradient; in float32 the kernels' tensor-core products run in tf32 (2^-11 = 4.9e-4), the PyTorch
path in float32, so gradients agree to ~1e-3. A wrong term or index is O(1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalodon_lite.config import preset
from megalodon_lite.model import MegalodonLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _step(model: MegalodonLM, tokens: torch.Tensor, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        logits, _ = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item(), {name: p.grad.detach().float().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("autocast", "loss_rtol", "grad_rtol"), [(True, 5e-3, 5e-2), (False, 1e-4, 5e-3)],
                         ids=["bf16-autocast", "float32"])
def test_training_step_with_kernels_matches_pytorch(autocast: bool, loss_rtol: float, grad_rtol: float) -> None:
    # two layers of the `small` preset (the official mega200M widths), two chunks plus a partial one
    config = preset("small", num_layers=2, vocab_size=256)
    torch.manual_seed(0)
    tokens = torch.randint(0, 256, (2, 2 * config.chunk_size + 301), device="cuda")
    reference = MegalodonLM(config.replace(backend="torch")).cuda()
    with torch.no_grad():  # every norm scale and the attention affine away from its zero init
        for name, p in reference.named_parameters():
            if "weight" in name and p.dim() == 1 or name.endswith(("gamma", "beta")) and "attention" in name:
                p.normal_(0, 0.2)
    kernels = MegalodonLM(config.replace(backend="triton")).cuda()
    kernels.load_state_dict(reference.state_dict())
    loss_torch, grads_torch = _step(reference, tokens, autocast)
    loss_triton, grads_triton = _step(kernels, tokens, autocast)
    print(f"loss: torch {loss_torch:.6f}, triton {loss_triton:.6f}, rel {abs(loss_triton - loss_torch) / loss_torch:.2e}")
    assert abs(loss_triton - loss_torch) <= loss_rtol * loss_torch
    worst = 0.0
    for name, want in grads_torch.items():
        got = grads_triton[name]
        assert torch.isfinite(got).all(), name
        rel = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        worst = max(worst, rel)
        print(f"  {name:<45} |grad| {want.norm().item():.3e}  rel diff {rel:.2e}")
        assert rel <= grad_rtol, f"{name}: relative gradient difference {rel:.2e} > {grad_rtol:.0e}"
    print(f"worst relative gradient difference {worst:.2e} (bound {grad_rtol:.0e})")
