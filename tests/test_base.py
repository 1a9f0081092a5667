"""Backbone loading: real bitsandbytes layers on CPU, frozen weights, clear errors."""

import bitsandbytes as bnb
import pytest
import torch

import adapters
from adapters.backbone.loading import is_decoder_config, load_backbone


@pytest.mark.parametrize(
    "quantization,layer",
    [("nf4", bnb.nn.Linear4bit), ("fp4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt), (None, torch.nn.Linear)],
)
def test_quantization_modes_use_real_bnb_layers(tiny_model, quantization, layer):
    network, base = load_backbone(tiny_model, quantization=quantization)
    linears = [m for m in network.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is layer for m in linears)
    if quantization in ("nf4", "fp4"):
        assert all(m.weight.quant_state.quant_type == quantization for m in linears)
        assert all(m.weight.quant_state.nested for m in linears)  # double quantization on by default
    assert base.compute_dtype == torch.float32  # CPU: fp32 compute
    assert not any(p.requires_grad for p in network.parameters())


def test_double_quant_can_be_turned_off(tiny_llama):
    network, _ = load_backbone(tiny_llama, quantization="nf4", double_quant=False)
    layer = next(m for m in network.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert not layer.weight.quant_state.nested


def test_quantized_forward_runs_and_is_close_to_full_precision(tiny_llama):
    ids = torch.tensor([[5, 6, 7, 8]])
    full = load_backbone(tiny_llama, quantization=None)[0](input_ids=ids).last_hidden_state
    for q in ("nf4", "int8"):
        out = load_backbone(tiny_llama, quantization=q)[0](input_ids=ids).last_hidden_state
        assert out.shape == full.shape and torch.isfinite(out).all()
        assert torch.nn.functional.cosine_similarity(out.flatten(), full.flatten(), dim=0) > 0.9


def test_encoder_and_decoder_detected(tiny_llama, tiny_bert):
    assert load_backbone(tiny_llama, quantization=None)[1].is_decoder
    bert, info = load_backbone(tiny_bert, quantization="nf4")
    assert not info.is_decoder
    assert bert.pooler is None  # unused pooler dropped, never quantized or LoRA-targeted


def test_unknown_model_is_a_clear_error():
    with pytest.raises(adapters.UnknownModelError, match="not a packaged model"):
        load_backbone("no-such-org/no-such-model-xyz", quantization=None)


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(adapters.UnknownModelError, match="config.json"):
        load_backbone(str(tmp_path), quantization=None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quantization": "int4"}, "quantization"),
        ({"dtype": "fp8"}, "dtype"),
        ({"padding_side": "middle"}, "padding_side"),
    ],
)
def test_bad_settings_are_config_errors(tiny_llama, kwargs, match):
    with pytest.raises(adapters.ConfigError, match=match):
        load_backbone(tiny_llama, **{"quantization": None, **kwargs})


def test_packaged_encoder_resolves_offline():
    network, base = load_backbone("minilm-l6", quantization="nf4")
    assert not base.is_decoder and base.hidden_size == 384
    assert isinstance(network.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)


def test_is_decoder_config():
    from transformers import BertConfig, LlamaConfig

    assert is_decoder_config(LlamaConfig()) and not is_decoder_config(BertConfig())


def test_4bit_weights_load_as_packed_bytes_whatever_the_launcher(monkeypatch):
    """One storage rule: bytes at load; FSDP reinterprets them when it shards (tests/test_fsdp.py)."""
    from adapters.backbone.loading import quantization_config

    assert quantization_config("nf4", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quantization_config("nf4", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8
