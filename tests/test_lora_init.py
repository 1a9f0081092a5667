"""``LoRA(init=...)``: peft's initialisations. LoftQ on a 4-bit base equals peft's own
``replace_lora_weights_loftq`` where peft can find the weights, brings the adapted model closer to the
unquantized base than the quantized base is, is recorded in the artifact and not re-run on load; inits that
rewrite the base, or LoftQ without a 4-bit base, are refused before anything loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import adapters
from adapters.methods import lora as lora_module

from .helpers import toy_sentiment


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state["peft"].named_parameters() if "lora_" in k}


def test_loftq_starts_each_layer_at_the_best_rank_r_correction(tiny_llama):
    """For every 4-bit layer, ``(alpha / r) B A`` is the best rank-``r`` approximation of ``W - dequantize(W_4bit)``:
    its error is the Eckart-Young optimum, the norm of the residual's singular values past ``r``."""
    import bitsandbytes as bnb
    from peft.tuners.lora import Linear4bit
    from safetensors.torch import load_file

    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=4, init="loftq"), head=adapters.CausalLM(), quantization="nf4"
    )
    weights = load_file(str(Path(tiny_llama) / "model.safetensors"))
    layers = [(n, m) for n, m in model.adapter_state["peft"].named_modules() if isinstance(m, Linear4bit)]
    assert len(layers) >= 14
    for name, layer in layers:
        exact = weights[name.removeprefix("base_model.model.") + ".weight"].float()
        lost = exact - bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        optimum = torch.linalg.svdvals(lost)[4:].norm()
        assert float((lost - update).norm()) == pytest.approx(float(optimum), rel=1e-3), name
        assert float(optimum) < float(lost.norm())  # it does correct something


def _hidden(model, ids):
    with torch.no_grad():
        return model.backbone(input_ids=ids).last_hidden_state.float()


def test_loftq_starts_closer_to_the_unquantized_base(tiny_llama):
    """The classifier's backbone (headless: the weight names lack peft's LM prefix) with LoftQ computes closer
    to the fp32 base than the NF4 base with the default start, which equals the NF4 base."""
    head = adapters.Classification(labels=["neg", "pos"])
    ids = adapters.adapt(tiny_llama, head=head, quantization=None).encode(["the plot of the film was dull"])
    ids = ids["input_ids"]
    exact = _hidden(adapters.adapt(tiny_llama, head=head, quantization=None), ids)
    plain = _hidden(adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=8), head=head, quantization="nf4"), ids)
    loftq = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=8, init="loftq"), head=head, quantization="nf4")
    corrected = _hidden(loftq, ids)
    assert (corrected - exact).norm() < 0.9 * (plain - exact).norm()


def test_the_init_is_recorded_and_not_rerun_on_load(tiny_llama, tmp_path, monkeypatch):
    from peft import PeftConfig

    model = adapters.adapt(
        tiny_llama,
        adapter=adapters.LoRA(r=4, init="loftq"),
        head=adapters.Classification(labels=["neg", "pos"]),
        quantization="nf4",
    )
    adapters.train(model, toy_sentiment(16), None, adapters.TrainConfig(max_steps=2, progress=False))
    model.save_pretrained(tmp_path / "art")
    monkeypatch.setattr(lora_module, "loftq", lambda *a: pytest.fail("LoftQ ran again on load"))
    again = adapters.load(tmp_path / "art")
    assert again.adapter.init == "loftq"
    texts = ["a moving film", "a dull mess"]
    assert again.predict(texts, probabilities=True) == model.predict(texts, probabilities=True)
    assert PeftConfig.from_pretrained(tmp_path / "art" / "adapter").r == 4  # peft reads the artifact's adapter


def test_gaussian_starts_b_at_zero_and_a_with_std_one_over_r(tiny_llama):
    model = adapters.adapt(
        tiny_llama, adapter=adapters.LoRA(r=8, init="gaussian"), head=adapters.CausalLM(), quantization=None
    )
    tensors = _lora_tensors(model)
    a = torch.cat([t.flatten() for k, t in tensors.items() if "lora_A" in k])
    assert all(float(t.abs().max()) == 0 for k, t in tensors.items() if "lora_B" in k)
    assert abs(float(a.std()) - 1 / 8) < 0.01  # peft's gaussian: normal with std 1 / r


@pytest.mark.parametrize("init,says", [("corda", "preprocess_corda"), ("x", "not one of")])
def test_an_init_that_cannot_be_kept_is_refused(init, says):
    with pytest.raises(adapters.ConfigError, match=says):
        adapters.LoRA(init=init)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_base_and_save_a_plain_lora_of_twice_the_rank(init, tiny_llama, tmp_path):
    """PiSSA/OLoRA (peft's): the adapted model starts equal to its base, with the frozen weights rewritten as
    the residual; the artifact holds peft's conversion, a rank-2r LoRA of the unchanged base, which ``load``
    (without decomposing again) and PEFT's own ``PeftModel`` apply with the trained model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def logits(network, ids):
        with torch.no_grad():
            return network(input_ids=ids).logits

    head = adapters.CausalLM(max_new_tokens=2)
    base = adapters.adapt(tiny_llama, head=head, quantization=None, dtype="fp32")
    model = adapters.adapt(
        tiny_llama, adapters.LoRA(r=4, init=init, dropout=0.0), head, quantization=None, dtype="fp32"
    )
    ids = base.encode(["the plot of the film was dull"])["input_ids"]
    assert torch.allclose(logits(model.backbone, ids), logits(base.backbone, ids), atol=1e-5)
    rewritten = dict(model.backbone.named_parameters())["model.layers.0.self_attn.q_proj.base_layer.weight"]
    original = dict(base.backbone.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.allclose(rewritten, original, atol=1e-3)  # the frozen weight is now the residual
    adapters.train(model, [{"text": "good film", "label": "fun"}] * 16, None,
                   adapters.TrainConfig(max_steps=3, lr=1e-2, progress=False))  # fmt: skip
    trained = logits(model.backbone, ids)
    assert not torch.allclose(trained, logits(base.backbone, ids), atol=1e-3)
    model.save_pretrained(tmp_path / "art")
    again = adapters.load(tmp_path / "art")
    assert (again.adapter.r, again.adapter.alpha, again.adapter.init) == (8, 32, "default")
    assert torch.allclose(logits(again.backbone, ids), trained, atol=1e-5)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(tmp_path / "art/adapter"))
    assert torch.allclose(logits(peft, ids), trained, atol=1e-5)
    assert model.predict("good film") == again.predict("good film")  # the live model still answers after save


def test_pissa_on_a_quantized_or_sharded_load_is_refused_before_loading():
    with pytest.raises(adapters.ConfigError, match=r"init='pissa' rewrites the frozen weights.*nf4.*QPiSSA"):
        adapters.adapt("no/such-model", adapters.LoRA(init="pissa"), adapters.CausalLM(), quantization="nf4")
    with pytest.raises(adapters.ConfigError, match=r"init='olora' decomposes whole weights.*fsdp=True"):
        adapters.adapt("no/such-model", adapters.LoRA(init="olora"), adapters.CausalLM(), quantization=None, fsdp=True)


def test_loftq_without_a_4bit_base_is_refused_before_loading():
    with pytest.raises(adapters.ConfigError, match="quantization='nf4' or 'fp4'"):
        adapters.adapt(
            "no/such-model", adapter=adapters.LoRA(init="loftq"), head=adapters.CausalLM(), quantization=None
        )


def test_eva_starts_a_from_the_training_rows_and_is_recorded(tiny_llama, tmp_path, monkeypatch):
    """``init="eva"``: at ``train`` (a fresh run), ``A`` of every layer becomes orthonormal directions of its
    inputs on the first training rows (peft's ``initialize_lora_eva_weights``), ``B`` starts at zero; the init is
    recorded and ``load`` does not run it."""
    head = adapters.Classification(labels=["neg", "pos"])
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4, init="eva", dropout=0.0), head=head)
    seen = {}

    def record_then_stop(model_, batches):
        lora_module.eva(model_.adapter_state["peft"], batches)
        seen.update(_lora_tensors(model_))

    monkeypatch.setattr(model.adapter, "initialize_from_data", record_then_stop)
    adapters.train(model, toy_sentiment(32), None, adapters.TrainConfig(max_steps=1, progress=False))
    a_weights = [t for k, t in seen.items() if "lora_A" in k]
    assert len(a_weights) >= 14 and all(float(t.abs().max()) == 0 for k, t in seen.items() if "lora_B" in k)
    for a in a_weights:
        torch.testing.assert_close(a @ a.T, torch.eye(4), atol=1e-4, rtol=0)  # principal directions
    model.save_pretrained(tmp_path / "art")
    monkeypatch.setattr(lora_module, "eva", lambda *a: pytest.fail("EVA ran again on load"))
    again = adapters.load(tmp_path / "art")
    assert again.adapter.init == "eva"
    assert again.predict(["a moving film"], probabilities=True) == model.predict(["a moving film"], probabilities=True)


def test_eva_projects_one_position_on_the_vocabulary_and_starts_as_peft_does(tiny_llama):
    """A causal LM's EVA forwards ask for one position's logits (``logits_to_keep=1``): the layers' inputs are
    the same, so every ``A`` equals the one of peft's own forward, which projects every position."""
    import copy

    from peft import initialize_lora_eva_weights

    from adapters.methods.lora_init import eva, padded_batches

    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4, init="eva", dropout=0.0), head=adapters.CausalLM())
    ours, theirs = model.adapter_state["peft"], copy.deepcopy(model.adapter_state["peft"])
    texts = ["a long and moving film about two brothers and the sea", "dull", "it was fine", "not good at all"]
    rows = [model.tokenizer(t)["input_ids"] for t in texts]
    batches = padded_batches(rows * 4, pad=0, size=4, device="cpu")
    widths = []
    hook = ours.get_base_model().lm_head.register_forward_hook(lambda m, i, o: widths.append(o.shape[1]))
    torch.manual_seed(0)  # peft's low-rank SVD draws random projections
    eva(ours, batches)
    hook.remove()
    torch.manual_seed(0)
    initialize_lora_eva_weights(
        theirs,
        dataloader=batches,
        forward_fn=lambda m, b: m(**b),
        gather_distributed_inputs=False,
        show_progress_bar=False,
    )
    assert widths and set(widths) == {1}
    a_ours, a_theirs = _lora_tensors(model), {k: v for k, v in theirs.named_parameters() if "lora_" in k}
    assert a_ours.keys() == a_theirs.keys() and len(a_ours) >= 14
    for key, tensor in a_ours.items():
        torch.testing.assert_close(tensor, a_theirs[key], rtol=0, atol=0, msg=key)


def test_eva_starts_once_never_over_trained_weights(tiny_llama, tmp_path, monkeypatch):
    """A second ``train`` of the same model, or ``train`` of a loaded artifact, keeps the weights it has: EVA
    runs only for an adapter that has never been started or trained."""
    head = adapters.Classification(labels=["neg", "pos"])
    model = adapters.adapt(tiny_llama, adapter=adapters.LoRA(r=4, init="eva", dropout=0.0), head=head)
    config = adapters.TrainConfig(max_steps=1, progress=False)
    adapters.train(model, toy_sentiment(32), None, config)
    model.save_pretrained(tmp_path / "art")
    monkeypatch.setattr(lora_module, "eva", lambda *a: pytest.fail("EVA ran over trained weights"))
    adapters.train(model, toy_sentiment(32), None, config)
    adapters.train(adapters.load(tmp_path / "art"), toy_sentiment(32), None, config)


MEASURE_LOFTQ_PEAK = """
import sys, torch
import bitsandbytes as bnb
from peft import LoraConfig, get_peft_model
from adapters.methods import lora_init

def status(key):
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(key))

def peak(o, i):
    net = torch.nn.Module()
    net.proj = bnb.nn.Linear4bit(i, o, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    weight = torch.randn(o, i)
    net.proj.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    layer = get_peft_model(net, LoraConfig(r=16, lora_alpha=32, target_modules=["proj"])).base_model.model.proj
    open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from now
    resident = status("VmRSS")
    lora_init._start(layer, "default", weight)
    return status("VmHWM") - resident

for shape in sys.argv[1:]:
    print(shape, peak(*map(int, shape.split("x"))), flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_the_memory_estimate_counts_loftq_s_peak(tiny_llama):
    """The estimate's ``init`` peak: LoftQ's own bytes are within 30% of the peak resident memory measured
    around one layer's start, and the estimate adds them to the adapted model's."""
    import subprocess
    import sys

    from adapters.methods.lora_init import decomposition_bytes

    shapes = [(2048, 2048), (1536, 576)]
    # one process, each layer started twice; every large block is mmapped and handed back when freed
    # (MALLOC_MMAP_THRESHOLD_), so each start's peak is its own: seen 0.89-0.95x of the estimate, where glibc's
    # reuse of freed blocks had made separate processes read 0.69-1.04x
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    argv = [f"{o}x{i}" for o, i in shapes for _ in range(2)]
    out = subprocess.run([sys.executable, "-c", MEASURE_LOFTQ_PEAK, *argv], capture_output=True, text=True, env=env)
    measured: dict[str, int] = {}
    for line in out.stdout.splitlines():
        shape, peak = line.split()
        measured[shape] = max(measured.get(shape, 0), int(peak))  # the worst start: the estimate is for it
    assert len(measured) == len(shapes), out.stderr[-2000:]
    for o, i in shapes:
        assert 0.7 < measured[f"{o}x{i}"] / decomposition_bytes([(o, i)]) < 1.3, (o, i, measured)
    loftq = adapters.estimate_memory(tiny_llama, adapters.LoRA(r=4, init="loftq"), quantization="nf4")
    default = adapters.estimate_memory(tiny_llama, adapters.LoRA(r=4), quantization="nf4")
    held = loftq.base_quantized + loftq.base_unquantized + loftq.trainable
    assert default.init == 0 and loftq.init > held and "init peak" in loftq.table()
    assert loftq.peak == max(loftq.tensors, loftq.load, loftq.init) + loftq.framework
