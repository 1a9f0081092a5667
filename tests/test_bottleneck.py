"""Bottleneck adapters: placement found structurally on 11 architectures, quantized or not."""

import pytest
import torch

import adapters
from adapters.methods.bottleneck import BottleneckAdapter

from .helpers import save_tiny

LABELS = adapters.Classification(labels=["neg", "pos"])
TEXTS = ["good fun film", "a dull and tedious mess"]

# (config class, kwargs, expected Pfeiffer and Houlsby target suffixes in block 0)
ARCHITECTURES = {
    "llama": (
        "LlamaConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "mlp.down_proj",
        "self_attn.o_proj",
    ),
    "mistral": (
        "MistralConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "mlp.down_proj",
        "self_attn.o_proj",
    ),
    "qwen2": (
        "Qwen2Config",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "mlp.down_proj",
        "self_attn.o_proj",
    ),
    "gemma": (
        "GemmaConfig",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "head_dim": 16,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
        },
        "mlp.down_proj",
        "self_attn.o_proj",
    ),
    "phi3": (
        "Phi3Config",
        {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
        "mlp.down_proj",
        "self_attn.o_proj",
    ),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}, "mlp.c_proj", "attn.c_proj"),
    "gpt_neox": (
        "GPTNeoXConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "mlp.dense_4h_to_h",
        "attention.dense",
    ),
    "opt": (
        "OPTConfig",
        {
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 64,
        },
        "fc2",
        "self_attn.out_proj",
    ),
    "bert": (
        "BertConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "output.dense",
        "attention.output.dense",
    ),
    "roberta": (
        "RobertaConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        "output.dense",
        "attention.output.dense",
    ),
    "distilbert": (
        "DistilBertConfig",
        {"dim": 64, "hidden_dim": 128, "n_layers": 2, "n_heads": 4},
        "ffn.lin2",
        "attention.out_lin",
    ),
}


@pytest.fixture(scope="module")
def tiny_archs(tmp_path_factory):
    import transformers

    folders = {}
    for name, (config_cls, kwargs, _, _) in ARCHITECTURES.items():
        config = getattr(transformers, config_cls)(vocab_size=64, max_position_embeddings=128, pad_token_id=0, **kwargs)
        folders[name] = save_tiny(
            transformers.AutoModel.from_config(config),
            tmp_path_factory.mktemp(name),
            bert=name in ("bert", "roberta", "distilbert"),
        )
    return folders


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("quantization", ["nf4", None])
def test_placement_on_every_architecture(tiny_archs, arch, quantization):
    _, _, ffn, attn = ARCHITECTURES[arch]
    base = adapters.adapt(tiny_archs[arch], adapter=None, head=LABELS, quantization=quantization)
    for placement, per_block, suffixes in [("pfeiffer", 1, (ffn,)), ("houlsby", 2, (attn, ffn))]:
        model = adapters.adapt(
            tiny_archs[arch],
            adapter=adapters.Bottleneck(placement=placement, reduction=4),
            head=LABELS,
            quantization=quantization,
        )
        targets = model.adapter_layers.targets
        assert len(targets) == 2 * per_block, targets
        assert sorted(t.split(".0.", 1)[1] for t in targets if ".0." in t) == sorted(suffixes)
        assert all(
            a.down.out_features == 16 and a.up.weight.dtype == torch.float32
            for a in model.adapter_layers.adapters.values()
        )
        # up-projection starts at zero: identical logits to the un-adapted base with the same head
        model.head.load_state_dict(base.head.state_dict())
        assert torch.equal(model.logits(TEXTS), base.logits(TEXTS))


def test_only_adapters_and_head_train_and_4bit_base_stays_bit_identical(tiny_llama, toy_data):
    model = adapters.adapt(
        tiny_llama, adapter=adapters.Bottleneck(placement="houlsby", bottleneck_dim=8), head=LABELS, quantization="nf4"
    )
    before = {n: t.clone() for n, t in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("adapter_layers.", "head.")) for n in trainable)
    adapters.train(model, toy_data[0], None, adapters.TrainConfig(max_steps=3, lr=1e-2, batch_size=8, progress=False))
    after = model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable and any(".up." in n for n in changed)
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)


def test_trains_on_encoder_and_decoder(tiny_model):
    from .helpers import toy_sentiment

    model = adapters.adapt(tiny_model, adapter=adapters.Bottleneck(reduction=4), head=LABELS, quantization="nf4")
    untrained = adapters.evaluate(model, toy_sentiment(32, seed=1))
    metrics = adapters.train(
        model,
        toy_sentiment(128),
        toy_sentiment(32, seed=1),
        adapters.TrainConfig(epochs=5, lr=5e-3, head_lr=2e-2, batch_size=16, progress=False),
    )
    assert metrics["eval_accuracy"] >= 0.75 and metrics["eval_loss"] < untrained["eval_loss"]


def test_layers_restrict_the_blocks(tiny_llama):
    model = adapters.adapt(tiny_llama, adapter=adapters.Bottleneck(layers=[-1]), head=LABELS, quantization=None)
    assert model.adapter_layers.targets == ["layers.1.mlp.down_proj"]
    with pytest.raises(adapters.ConfigError, match="out of range"):
        adapters.adapt(tiny_llama, adapter=adapters.Bottleneck(layers=[5]), head=LABELS, quantization=None)


def test_targets_escape_hatch_and_its_errors(tiny_llama):
    model = adapters.adapt(
        tiny_llama, adapter=adapters.Bottleneck(targets=["up_proj"]), head=LABELS, quantization="nf4"
    )
    assert model.adapter_layers.targets == ["layers.0.mlp.up_proj", "layers.1.mlp.up_proj"]
    assert all(
        a.down.in_features == 128 for a in model.adapter_layers.adapters.values()
    )  # sized to the module's output
    with pytest.raises(adapters.TargetModulesError, match="match no module"):
        adapters.adapt(
            tiny_llama, adapter=adapters.Bottleneck(targets=["nothing_here"]), head=LABELS, quantization=None
        )


def test_architecture_without_blocks_is_a_clear_error(tmp_path):
    from adapters.methods.bottleneck import BottleneckLayers
    from adapters.methods.targets import find_block_stack

    flat = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(adapters.TargetModulesError, match="targets="):
        find_block_stack(flat)
    with pytest.raises(adapters.TargetModulesError, match="no attention output projection"):
        BottleneckLayers(
            torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8))])}),
            adapters.Bottleneck(placement="houlsby"),
            8,
        )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"placement": "middle"},
        {"reduction": 0},
        {"bottleneck_dim": 0},
        {"activation": "swish2"},
        {"dropout": 1.0},
        {"layers": []},
        {"targets": []},
    ],
)
def test_bad_bottleneck_values(kwargs):
    with pytest.raises(adapters.ConfigError):
        adapters.Bottleneck(**kwargs)


def test_adapter_module_is_residual_with_zero_up():
    adapter = BottleneckAdapter(16, 4, "gelu", 0.0, 2.0)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(adapter(x), x) and adapter(x).dtype == torch.bfloat16


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_round_trip(tiny_model, toy_data, tmp_path, quantization):
    model = adapters.adapt(
        tiny_model,
        adapter=adapters.Bottleneck(placement="houlsby", reduction=8),
        head=LABELS,
        quantization=quantization,
    )
    adapters.train(model, toy_data[0], None, adapters.TrainConfig(max_steps=3, lr=1e-2, batch_size=8, progress=False))
    model.save_pretrained(tmp_path / "art")
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == [
        "README.md",
        "bottleneck.safetensors",
        "head.safetensors",
        "qadapters-manifest.json",
        "qadapters.json",
    ]
    again = adapters.load(tmp_path / "art")
    assert again.adapter == model.adapter
    assert torch.allclose(again.logits(TEXTS), model.logits(TEXTS), atol=1e-5)


def test_loading_onto_a_base_of_another_shape_fails(tiny_llama, tiny_bert, tmp_path):
    model = adapters.adapt(tiny_llama, adapter=adapters.Bottleneck(), head=LABELS)
    model.save_pretrained(tmp_path / "art")
    with pytest.raises(adapters.CheckpointError):
        adapters.load(tmp_path / "art", base=tiny_bert)
