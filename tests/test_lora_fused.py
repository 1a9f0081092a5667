"""The lean LoRA forward (adapters/lora_fused.py) against peft's own: outputs, gradients, fall-backs."""

import copy

import pytest
import torch

import adapters
from adapters.methods.lora_fused import _lean_adapters, drop_out, fuse_lora

IDS = torch.randint(4, 20, (3, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _adapted(tiny_llama, quantization, **lora):
    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4, **lora),
        head=adapters.Classification(labels=["a", "b"]),
        quantization=quantization,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at start would hide any error in the update
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model.eval()


def _peft_logits(model):
    """The logits with peft's own forward in every LoRA layer (the lean one put back afterwards)."""
    layers = [m for m in _lora_layers(model) if "forward" in vars(m)]
    saved = [vars(m).pop("forward") for m in layers]
    try:
        with torch.inference_mode():
            return model(input_ids=IDS, attention_mask=MASK)["logits"]
    finally:
        for m, forward in zip(layers, saved, strict=False):
            m.forward = forward


def _lean_logits(model, no_grad=False):
    with torch.no_grad() if no_grad else torch.inference_mode():
        return model(input_ids=IDS, attention_mask=MASK)["logits"]


@pytest.mark.parametrize("quantization", [None, "nf4", "int8"])
def test_lean_forward_equals_peft_forward(tiny_llama, quantization):
    model = _adapted(tiny_llama, quantization)
    assert all("forward" in vars(m) for m in _lora_layers(model))  # every adapted linear layer has it
    expected = _peft_logits(model)
    assert torch.allclose(_lean_logits(model), expected, atol=1e-5)
    assert torch.allclose(_lean_logits(model, no_grad=True), expected, atol=1e-5)
    assert not torch.allclose(expected, _base_logits(model), atol=1e-3)  # the update is really there


def _base_logits(model):
    with model.adapter_state["peft"].disable_adapter(), torch.inference_mode():
        return model(input_ids=IDS, attention_mask=MASK)["logits"]


def test_layers_reading_one_input_share_one_low_rank_product(tiny_llama):
    """q/k/v (and o: same parent, same width) are one group; the stacked product is computed once for
    the group and freed with its input."""
    model = _adapted(tiny_llama, None)
    attention = model.adapter_state["peft"].base_model.model.layers[0].self_attn
    q, k, v, o = (getattr(attention, f"{p}_proj") for p in "qkvo")
    x = torch.randn(2, 5, 64)
    calls = []
    original = torch.Tensor.__matmul__
    with torch.inference_mode():
        torch.Tensor.__matmul__ = lambda a, b: calls.append(b.shape) or original(a, b)
        try:
            outputs = [layer(x) for layer in (q, k, v)]
        finally:
            torch.Tensor.__matmul__ = original
        assert calls == [torch.Size([64, 16])]  # one matmul with the four stacked A (4 x r=4) for q, k, v
        for layer, out in zip((q, k, v), outputs, strict=False):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            scale = layer.scaling["default"]
            assert torch.allclose(out, layer.base_layer(x) + scale * (x @ a.t()) @ b.t(), atol=1e-5)
        assert q._lean_slot  # kept while its input lives
        with torch.no_grad():  # an A changed in place since: computed afresh, not taken from the slot
            k.lora_A["default"].weight.mul_(2)
        a, b = k.lora_A["default"].weight, k.lora_B["default"].weight
        assert torch.allclose(k(x), k.base_layer(x) + k.scaling["default"] * (x @ a.t()) @ b.t(), atol=1e-5)
        del x
    assert not q._lean_slot  # freed with it
    assert o._lean_group is q._lean_group


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_lean_forward_under_bf16_autocast_equals_peft(tiny_llama, quantization):
    """Under bf16 autocast (training on bf16 GPUs and CPUs) the lean forward runs too, and gives peft's
    logits and gradients within bf16 rounding (peft rounds three times where one addmm rounds once)."""
    model = _adapted(tiny_llama, quantization, dropout=0.0)
    layer = _lora_layers(model)[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert _lean_adapters(layer, torch.randn(1, 64), (), {}) == ["default"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours_loss, ours = _training_grads(model, peft_forward=False)
        peft_loss, theirs = _training_grads(model, peft_forward=True)
    assert abs(ours_loss - peft_loss) < 2e-2
    for name in ours:
        scale = theirs[name].abs().max().item() + 1e-6
        assert (ours[name] - theirs[name]).abs().max().item() / scale < 5e-2, name


def test_cpu_dropout_draws_masks_at_the_asked_rate():
    """``drop_out``: the asked share of elements zeroed (p rounded to 1/65536), survivors scaled so the
    mean is kept, the gradient masked and scaled alike, a new mask every call."""
    x = torch.ones(400, 500, requires_grad=True)
    torch.manual_seed(0)
    out = drop_out(x, 0.05)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.003
    steps = round(0.05 * 65536)
    assert torch.all((out == 0) | torch.isclose(out, torch.tensor(65536 / (65536 - steps))))
    assert abs(out.mean().item() - 1.0) < 0.01
    out.backward(torch.full_like(out, 2.0))
    assert torch.equal(x.grad, out.detach() * 2)
    assert not torch.equal(drop_out(x, 0.05) == 0, out == 0)
    torch.manual_seed(0)
    assert torch.equal(drop_out(x, 0.05), out)  # seeded by torch's generator
    assert drop_out(x, 0.0) is x
    assert torch.count_nonzero(drop_out(x, 1.0)) == 0
    odd = torch.ones(3, 7)
    assert drop_out(odd, 0.5).shape == odd.shape  # not a multiple of four elements


def test_per_row_adapter_names_take_peft_path(tiny_llama):
    model = _adapted(tiny_llama, None)
    layer = _lora_layers(model)[0]
    x = torch.randn(2, 3, 64)
    assert _lean_adapters(layer, x, (), {}) == ["default"]  # training or not, with gradients or not
    assert _lean_adapters(layer, x, (), {"adapter_names": ["default"]}) is None


def _training_grads(model, peft_forward: bool, seed: int = 0):
    """Loss and gradients of one training step, with peft's forward or the lean one."""
    layers = [m for m in _lora_layers(model) if "forward" in vars(m)]
    saved = [vars(m).pop("forward") for m in layers] if peft_forward else []
    try:
        model.train()
        model.zero_grad()
        torch.manual_seed(seed)  # the same dropout masks on both sides
        loss = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([0, 1, 1]))["loss"]
        loss.backward()
    finally:
        for m, forward in zip(layers, saved, strict=False):
            m.forward = forward
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "quantization,dropout,shared",
    [
        (None, 0.0, True),
        ("nf4", 0.0, True),
        (None, 0.1, True),
        ("nf4", 0.1, True),
        (None, 0.1, False),
        ("int8", 0.1, True),
    ],
)
def test_training_gradients_equal_peft(tiny_llama, quantization, dropout, shared):
    """Same loss and gradients as peft's forward, with dropout too: the masks are drawn in the same order
    (one per group with shared dropout, one per layer without)."""
    model = _adapted(tiny_llama, quantization, dropout=dropout, shared_dropout=shared)
    ours_loss, ours = _training_grads(model, peft_forward=False)
    peft_loss, theirs = _training_grads(model, peft_forward=True)
    assert abs(ours_loss - peft_loss) < 1e-5
    assert ours.keys() == theirs.keys() and any("lora_A" in n for n in ours)
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5), name
    assert any(ours[n].abs().sum() > 0 for n in ours if "lora_A" in n)


def test_dora_and_merged_layers_fall_back_to_peft(tiny_llama):
    model = _adapted(tiny_llama, None, dora=True)
    layer = _lora_layers(model)[0]
    with torch.no_grad():
        assert _lean_adapters(layer, torch.randn(1, 64), (), {}) is None
    assert torch.allclose(_lean_logits(model), _peft_logits(model), atol=1e-5)
    model = _adapted(tiny_llama, None)
    expected = _peft_logits(model)
    model.adapter_state["peft"].base_model.merge_adapter()
    with torch.no_grad():
        assert _lean_adapters(_lora_layers(model)[0], torch.randn(1, 64), (), {}) is None
    assert torch.allclose(_lean_logits(model), expected, atol=1e-4)


def test_several_adapters_switched_as_the_server_does(tiny_llama, tmp_path):
    first = _adapted(tiny_llama, None)
    second = _adapted(tiny_llama, None)
    with torch.no_grad():
        for p in second.adapter_state["peft"].parameters():
            if p.requires_grad:
                p.mul_(-1.5)
    second.save_pretrained(tmp_path / "second")
    expected = _peft_logits(second)
    name = first.adapter.join(first, tmp_path / "second", "other")
    first.adapter.switch(first, name, True)
    first.head.load_state_dict(second.head.state_dict())
    assert torch.allclose(_lean_logits(first), expected, atol=1e-5)
    assert torch.allclose(_lean_logits(first), _peft_logits(first), atol=1e-5)
    first.adapter.switch(first, name, False)  # adapters off: the base alone
    assert torch.allclose(_lean_logits(first), _peft_logits(first), atol=1e-5)


def test_a_deep_copy_uses_its_own_layers(tiny_llama):
    model = _adapted(tiny_llama, None)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.adapter_state["peft"].parameters():
            if p.requires_grad:
                p.mul_(2)
    layer = _lora_layers(twin)[0]
    assert all(m in _lora_layers(twin) for m in layer._lean_group)
    assert torch.allclose(_lean_logits(twin), _peft_logits(twin), atol=1e-5)
    assert not torch.allclose(_lean_logits(twin), _lean_logits(model), atol=1e-3)


def test_installing_twice_changes_nothing(tiny_llama):
    model = _adapted(tiny_llama, None)
    assert fuse_lora(model.adapter_state["peft"]) == 0


def test_fused_false_keeps_peft_forward(tiny_llama):
    model = _adapted(tiny_llama, None, fused=False)
    assert not any("forward" in vars(m) for m in _lora_layers(model))
    with pytest.raises(adapters.ConfigError, match="fused"):
        adapters.LoRA(fused="yes")
