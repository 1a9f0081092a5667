"""LoRA config -> peft, target checking, and peft compatibility of what we save."""

import pytest
import torch

import adapters
from adapters.lora import check_targets


def test_lora_maps_onto_peft_config(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4, alpha=8, dropout=0.1, rslora=True, dora=True),
                           head=adapters.Classification(labels=["a", "b"]), quantization=None)
    config = model.body.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.use_dora) == (4, 8, 0.1, True, True)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_on_4bit_layers_uses_peft_bnb_layer(tiny_llama):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4, targets=["q_proj", "v_proj"]),
                           head=adapters.Classification(labels=["a", "b"]), quantization="nf4")
    wrapped = [n for n, m in model.body.named_modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)


def test_regex_targets(tiny_bert):
    names = check_targets(adapters.base.load_backbone(tiny_bert, quantization=None).model, r".*attention\.self\.(query|value)")
    assert len(names) == 4


def test_targets_matching_nothing_name_the_existing_modules(tiny_llama):
    with pytest.raises(adapters.TargetModulesError, match="q_proj"):
        adapters.adapt(tiny_llama, adapter=adapters.LoRA(targets=["query_key_value"]),
                       head=adapters.Classification(labels=["a", "b"]), quantization="nf4")


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": 2.5}, {"alpha": 0}, {"dropout": 1.0}, {"targets": []}, {"targets": 3}])
def test_bad_lora_values(kwargs):
    with pytest.raises(adapters.ConfigError):
        adapters.LoRA(**kwargs)


def test_peft_loads_the_saved_adapter_folder(tiny_llama, tmp_path, toy_data):
    """The adapter/ subfolder is a standard peft adapter: PeftModel.from_pretrained reads it."""
    from peft import PeftModel
    from transformers import AutoModel

    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]),
                           quantization=None)
    adapters.train(model, toy_data[0], None, adapters.TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False))
    model.save_pretrained(tmp_path / "art")
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llama), str(tmp_path / "art" / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    peft_model.eval()
    with torch.no_grad():
        ours = model.body(input_ids=ids).last_hidden_state
        theirs = peft_model(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)
