"""The fused RMSNorm and rotary forms must compute what the model's own code computes: forward and
gradients as close to an fp64 reference as transformers' fp32 code is, the model's code kept wherever the
check fails (another formula) or the dtype is not fp32, and a deep copy computing with its own weights."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaModel
from transformers.models.llama import modeling_llama

import adapters
from adapters.backbone.kernels import _Rotary, use_fused_kernels

from .helpers import llama_config


def _model(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(llama_config(vocab_size=50))
    for module in model.modules():  # norms at 1.0 would hide a missing weight multiply
        if type(module).__name__.endswith("RMSNorm"):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    return model


def _gradients(model: nn.Module, dtype: torch.dtype, embeds: torch.Tensor) -> list[torch.Tensor]:
    x = embeds.to(dtype).requires_grad_()
    out = model(inputs_embeds=x).last_hidden_state
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=dtype)).sum().backward()
    return [out.detach(), x.grad] + [p.grad for p in model.parameters() if p.grad is not None]


@pytest.fixture
def unfused_rotary():
    """Leaves the modeling module's rotary function as it was found (the patch is process-wide)."""
    found = modeling_llama.apply_rotary_pos_emb
    yield getattr(found, "unfused", found)
    modeling_llama.apply_rotary_pos_emb = found


def test_fused_forms_are_as_close_to_fp64_as_the_models_own_code(unfused_rotary):
    modeling_llama.apply_rotary_pos_emb = unfused_rotary
    reference = _model()
    fused, wide = copy.deepcopy(reference), copy.deepcopy(reference).double()
    assert use_fused_kernels(fused) == ["LlamaRMSNorm", "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"]
    embeds = torch.randn(3, 11, 64)
    exact = _gradients(wide, torch.float64, embeds)
    fused_results = _gradients(fused, torch.float32, embeds)
    modeling_llama.apply_rotary_pos_emb = unfused_rotary  # the model's own code for the reference
    own_results = _gradients(reference, torch.float32, embeds)
    for own, ours, truth in zip(own_results, fused_results, exact, strict=True):
        own_error = (own.double() - truth).norm() / truth.norm()
        our_error = (ours.double() - truth).norm() / truth.norm()
        assert our_error <= 2 * own_error + 1e-6, (our_error, own_error)


def test_every_norm_of_the_loaded_base_is_replaced(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=None, head=adapters.Classification(labels=["a", "b"]))
    norms = [m for m in model.backbone.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all("forward" in vars(m) for m in norms)
    assert hasattr(modeling_llama.apply_rotary_pos_emb, "unfused")


class GemmaLikeRMSNorm(nn.Module):
    """An RMSNorm that scales by (1 + weight): not the formula the fused form computes."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width))
        self.variance_epsilon = 1e-6

    def forward(self, hidden):
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


def test_a_norm_of_another_formula_keeps_its_own_code():
    model = nn.Sequential(GemmaLikeRMSNorm(8))
    assert use_fused_kernels(model) == []
    assert "forward" not in vars(model[0])


def test_bf16_inputs_keep_the_models_rounding(unfused_rotary):
    model = _model()
    use_fused_kernels(model)
    norm = model.norm.to(torch.bfloat16)
    hidden = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert torch.equal(norm(hidden), type(norm).forward(norm, hidden))
    q, k = torch.randn(2, 4, 5, 16, dtype=torch.bfloat16), torch.randn(2, 2, 5, 16, dtype=torch.bfloat16)
    cos, sin = (t.to(torch.bfloat16) for t in model.rotary_emb(q.float(), torch.arange(5).expand(2, 5)))
    for got, expected in zip(
        modeling_llama.apply_rotary_pos_emb(q, k, cos, sin), unfused_rotary(q, k, cos, sin), strict=True
    ):
        assert torch.equal(got, expected)


def test_a_deep_copy_normalizes_with_its_own_weights():
    model = _model()
    use_fused_kernels(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.norm.weight.mul_(2)
    hidden = torch.randn(2, 3, 64)
    assert torch.allclose(twin.norm(hidden), 2 * model.norm(hidden), atol=1e-6)


def test_rotary_backward_is_the_gradient_of_the_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    angles = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(_Rotary.apply, (x, angles.cos(), angles.sin()))


def test_rotary_with_trainable_angles_takes_the_models_code(unfused_rotary):
    use_fused_kernels(_model())
    q, k = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 3, 16)
    angles = torch.randn(1, 3, 16, requires_grad=True)
    got = modeling_llama.apply_rotary_pos_emb(q, k, angles.cos(), angles.sin())
    expected = unfused_rotary(q, k, angles.cos(), angles.sin())
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    got[0].sum().backward()
    assert angles.grad is not None  # the gradient reached the angles: the model's own code ran
