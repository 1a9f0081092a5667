"""LoRA config -> peft, target checking, and peft compatibility of what we save."""

import pytest
import torch

import adapters
from adapters.methods.targets import check_targets


def test_lora_maps_onto_peft_config(tiny_llama):
    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4, alpha=8, dropout=0.1, rslora=True, dora=True),
        head=adapters.Classification(labels=["a", "b"]),
        quantization=None,
    )
    config = model.adapter_state["peft"].peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.use_dora) == (
        4,
        8,
        0.1,
        True,
        True,
    )
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_on_4bit_layers_uses_peft_bnb_layer(tiny_llama):
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4, targets=["q_proj", "v_proj"]),
        head=adapters.Classification(labels=["a", "b"]),
        quantization="nf4",
    )
    wrapped = [n for n, m in model.adapter_state["peft"].named_modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)


def test_regex_targets(tiny_bert):
    names = check_targets(
        adapters.backbone.loading.load_backbone(tiny_bert, quantization=None)[0], r".*attention\.self\.(query|value)"
    )
    assert len(names) == 4


def test_targets_matching_nothing_name_the_existing_modules(tiny_llama):
    with pytest.raises(adapters.TargetModulesError, match="q_proj"):
        adapters.adapt(
            tiny_llama,
            adapter=adapters.LoRA(targets=["query_key_value"]),
            head=adapters.Classification(labels=["a", "b"]),
            quantization="nf4",
        )


@pytest.mark.parametrize(
    "kwargs", [{"r": 0}, {"r": 2.5}, {"alpha": 0}, {"dropout": 1.0}, {"targets": []}, {"targets": 3}]
)
def test_bad_lora_values(kwargs):
    with pytest.raises(adapters.ConfigError):
        adapters.LoRA(**kwargs)


def test_peft_loads_the_saved_adapter_folder(tiny_llama, tmp_path, toy_data):
    """The adapter/ subfolder is a standard peft adapter: PeftModel.from_pretrained reads it."""
    from peft import PeftModel
    from transformers import AutoModel

    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4), head=adapters.Classification(labels=["neg", "pos"]), quantization=None
    )
    adapters.train(model, toy_data[0], None, adapters.TrainConfig(epochs=1, lr=1e-2, batch_size=8, progress=False))
    model.save_pretrained(tmp_path / "art")
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_llama), str(tmp_path / "art" / "adapter"))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    peft_model.eval()
    with torch.no_grad():
        ours = model.backbone(input_ids=ids).last_hidden_state
        theirs = peft_model(input_ids=ids).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_lora_on_the_top_blocks_only(tiny_llama, toy_data, tmp_path):
    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4, layers=[1]), head=adapters.Classification(labels=["neg", "pos"])
    )
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if "lora_" in n}
    assert adapted == {"1"}
    adapters.train(model, toy_data[0], None, adapters.TrainConfig(max_steps=2, lr=1e-2, batch_size=8, progress=False))
    model.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art")
    assert again.adapter.layers == [1]
    texts = [r["text"] for r in toy_data[1]]
    assert torch.allclose(model.logits(texts), again.logits(texts), atol=1e-6)


def test_lora_layers_counted_from_the_top(tiny_llama):
    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4, layers=[-1]), head=adapters.Classification(labels=["neg", "pos"])
    )
    adapted = {n.split(".layers.")[1].split(".")[0] for n, p in model.named_parameters() if "lora_" in n}
    assert adapted == {"1"}  # the last of 2 blocks
    with pytest.raises(adapters.ConfigError, match="has 2 blocks"):
        adapters.adapt(tiny_llama, adapter=adapters.LoRA(layers=[-3]), head=adapters.Classification(labels=["a", "b"]))


@pytest.mark.parametrize("layers", [[], ["1"], [True], 3])
def test_bad_lora_layers(layers):
    with pytest.raises(adapters.ConfigError, match="layers"):
        adapters.LoRA(layers=layers)


def test_lora_layers_beyond_the_model(tiny_llama):
    with pytest.raises(adapters.ConfigError, match="has 2 blocks"):
        adapters.adapt(tiny_llama, adapter=adapters.LoRA(layers=[5]), head=adapters.Classification(labels=["a", "b"]))


def _lora_inputs_and_saved_bytes(model, ids):
    """The dropped-out input each LoRA layer's A read, and the bytes autograd kept for backward, in one
    training forward."""
    from torch.autograd.graph import saved_tensors_hooks

    inputs, storages, total = {}, set(), [0]
    handles = [
        module.register_forward_hook(lambda m, args, out, n=name: inputs.__setitem__(n, out))
        for name, module in model.named_modules()
        if name.endswith("lora_dropout.default")
    ]

    def pack(t):
        if t.untyped_storage().data_ptr() not in storages:
            storages.add(t.untyped_storage().data_ptr())
            total[0] += t.untyped_storage().nbytes()
        return t

    model.train()
    with saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1]))["loss"]
    loss.backward()
    for h in handles:
        h.remove()
    return {n.removeprefix("backbone.").removesuffix(".lora_dropout.default"): t for n, t in inputs.items()}, total[0]


def test_layers_reading_one_input_share_one_dropped_out_copy(tiny_llama):
    ids = torch.randint(4, 20, (4, 12), generator=torch.Generator().manual_seed(0))
    saved = {}
    for shared in (False, True):
        model = adapters.adapt(
            tiny_llama,
            adapter=adapters.LoRA(r=4, dropout=0.1, shared_dropout=shared),
            head=adapters.Classification(labels=["a", "b"]),
        )
        torch.manual_seed(0)
        inputs, saved[shared] = _lora_inputs_and_saved_bytes(model, ids)
        attention = [inputs[f"layers.0.self_attn.{p}_proj"] for p in "qkv"]
        mlp = [inputs[f"layers.0.mlp.{p}_proj"] for p in ("gate", "up")]
        same = all(t is attention[0] for t in attention) and mlp[0] is mlp[1]
        assert same == shared
        # dropout semantics, shared or not: each value is dropped (0) or scaled by 1 / (1 - p)
        kept = attention[0] != 0
        assert 0.8 < kept.float().mean() < 0.98
    assert saved[True] < 0.9 * saved[False]  # one copy instead of three (q/k/v) and two (gate/up) per block


def test_shared_dropout_changes_nothing_without_dropout(tiny_llama):
    """dropout=0: gradients equal peft's own layers exactly."""
    ids = torch.randint(4, 20, (4, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for shared in (False, True):
        model = adapters.adapt(
            tiny_llama,
            adapter=adapters.LoRA(r=4, dropout=0.0, shared_dropout=shared),
            head=adapters.Classification(labels=["a", "b"], dropout=0.0),
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        _lora_inputs_and_saved_bytes(model, ids)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name
