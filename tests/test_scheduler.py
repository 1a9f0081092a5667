"""Continuous batching (``serving/scheduler.py``): rows of different artifacts (two LoRA adapters, a bottleneck
adapter and the bare base) decode together in one forward per step, joining and leaving between steps, and
each row's greedy text equals the text its artifact generates alone (``transformers``' ``generate``); a
seeded sample is the same whatever else is in the batch; chunked prefill changes nothing."""

from __future__ import annotations

import threading

import pytest
import torch

import adapters
from adapters.serving import scheduler as scheduling
from adapters.serving.backbones import load_served
from adapters.serving.sampling import Sampling
from adapters.serving.scheduler import Scheduler, Sequence

PROMPTS = ["the plot of the film", "a dull and tedious mess of a movie that", "good"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=[None, "nf4"], ids=["fp32", "nf4"])
def group(request, tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"scheduler-{request.param}")
    kinds = {
        "lora_a": (adapters.LoRA(r=4, dropout=0.0), "superb and moving"),
        "lora_b": (adapters.LoRA(r=4, dropout=0.0), "dull tedious mess"),
        "bottleneck": (adapters.Bottleneck(), "a film"),
        "base": (None, ""),
    }
    for i, (name, (adapter, answer)) in enumerate(kinds.items()):
        model = adapters.adapt(
            tiny_llama,
            adapter=adapter,
            head=adapters.CausalLM(max_new_tokens=NEW_TOKENS),
            quantization=request.param,
            seed=i,
        )
        if adapter is not None:
            rows = [{"text": PROMPTS[0], "label": answer}] * 8
            adapters.train(model, rows, None, adapters.TrainConfig(epochs=4, lr=1e-2, batch_size=8, progress=False))
        model.save_pretrained(root / name)
    served = load_served({name: root / name for name in kinds})
    assert len({member.group.index for member in served.values()}) == 1  # one shared base
    return served


def _alone(member, prompt, **settings):
    """The artifact's own generation, one request at a time (``transformers``' ``generate``)."""
    return member.predict([prompt], max_new_tokens=NEW_TOKENS, **settings)[0]


def _run_all(scheduler, requests):
    """Submit ``requests`` ((member, prompt, settings) triples): the first half while the backbone's lock is
    held (so they run as one batch), the rest as it decodes (they join it); return each one's text once all
    have finished."""
    results: dict = {}
    finished: dict = {}
    all_done = threading.Event()
    total = len(requests)

    group = requests[0][0].group
    group.lock.acquire()  # the first half waits together: they are prefilled and decoded as one batch
    for i, (member, prompt, settings) in enumerate(requests):
        if i == len(requests) // 2:
            group.lock.release()  # the second half joins a batch that is already decoding
        key = (member.name, prompt, settings.get("seed"))
        results[key] = ""

        def emit(piece, finish, key=key):
            if piece is not None:
                results[key] += piece
                return
            finished[key] = finish
            if len(finished) == total:
                all_done.set()

        batch = group.model.encode([prompt])  # a CausalLM head's prompt: the same for every member here
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        sampling = Sampling(**{k: v for k, v in settings.items() if k != "seed"})
        scheduler.submit(Sequence(member, ids, NEW_TOKENS, emit, sampling, settings.get("seed")))
    assert all_done.wait(120), finished
    assert all(reason in ("stop", "length") for reason in finished.values()), finished
    return results


def test_greedy_rows_of_mixed_artifacts_equal_their_texts_alone(group):
    requests = [(member, prompt, {}) for prompt in PROMPTS for member in group.values()]
    steps = []
    scheduler = Scheduler(next(iter(group.values())).group, observe=lambda name, value: steps.append((name, value)))
    together = _run_all(scheduler, requests)
    alone = {(m.name, p, None): _alone(m, p) for m, p, _ in requests}
    assert together == alone
    assert max(v for name, v in steps if name == "batch_size") > 4  # rows of several artifacts per forward
    assert len({text for text in alone.values()}) > 3  # the artifacts do answer differently


def test_chunked_prefill_changes_nothing(group, monkeypatch):
    monkeypatch.setattr(scheduling, "PREFILL_CHUNK", 2)
    requests = [(member, PROMPTS[1], {}) for member in group.values()]
    together = _run_all(Scheduler(next(iter(group.values())).group), requests)
    assert together == {(m.name, p, None): _alone(m, p) for m, p, _ in requests}


def test_a_seeded_sample_is_the_same_whatever_else_is_in_the_batch(group):
    member = group["lora_a"]
    seeded = {"temperature": 1.5, "top_p": 0.95, "seed": 7}
    scheduler = Scheduler(member.group)
    alone = _run_all(scheduler, [(member, PROMPTS[0], seeded)])
    crowd = [(m, p, {}) for p in PROMPTS for m in group.values()] + [(member, PROMPTS[0], seeded)]
    together = _run_all(scheduler, crowd)
    key = (member.name, PROMPTS[0], 7)
    assert together[key] == alone[key]
    other = _run_all(scheduler, [(member, PROMPTS[0], {**seeded, "seed": 8})])
    assert other[(member.name, PROMPTS[0], 8)] != alone[key]  # the seed is what decides


def test_a_cancelled_row_leaves_and_the_others_go_on(group):
    member, other = group["lora_a"], group["lora_b"]
    scheduler = Scheduler(member.group)
    scheduler.eos = set()
    texts, finished = {"a": "", "b": ""}, {}
    done = threading.Event()

    def emit_for(key):
        def emit(piece, finish):
            if piece is not None:
                texts[key] += piece
                if key == "a" and len(texts["a"]) > 0:
                    cancelled.cancelled.set()
            else:
                finished[key] = finish
                if len(finished) == 2:
                    done.set()

        return emit

    ids = member.group.model.tokenizer(PROMPTS[0])["input_ids"]
    cancelled = Sequence(member, ids, 100, emit_for("a"))
    scheduler.submit(cancelled)
    scheduler.submit(Sequence(other, ids, 20, emit_for("b")))
    assert done.wait(60)
    assert finished == {"a": "cancelled", "b": "length"}
    assert len(cancelled.generated) < 100


def test_a_full_queue_is_refused(group):
    from adapters.serving.batcher import QueueFull

    member = group["base"]
    scheduler = Scheduler(member.group, max_waiting=0)
    with pytest.raises(QueueFull):
        scheduler.submit(Sequence(member, [5, 6], 2, lambda piece, finish: None))


@pytest.fixture(scope="module")
def bf16_group(tiny_llama, tmp_path_factory):
    """Two LoRA artifacts on a bf16 base (fp32 adapters on bf16 outputs: the cast path)."""
    root = tmp_path_factory.mktemp("scheduler-bf16")
    for i, name in enumerate(("lora_a", "lora_b")):
        model = adapters.adapt(
            tiny_llama,
            adapter=adapters.LoRA(r=4, dropout=0.0),
            head=adapters.CausalLM(max_new_tokens=NEW_TOKENS),
            quantization=None,
            dtype="bfloat16",
            seed=i,
        )
        rows = [{"text": PROMPTS[0], "label": ["superb", "dull"][i]}] * 8
        adapters.train(model, rows, None, adapters.TrainConfig(epochs=4, lr=1e-2, batch_size=8, progress=False))
        model.save_pretrained(root / name)
    return load_served({name: root / name for name in ("lora_a", "lora_b")})


def test_the_segmented_lora_step_equals_peft_mixed_batch_forward(group):
    _segmented_against_peft(group)


def test_the_segmented_lora_step_on_a_bf16_base(bf16_group):
    _segmented_against_peft(bf16_group)


def _segmented_against_peft(group):
    """Rows sorted by adapter take our segmented step (``lora_fused._segmented``): the same logits as peft's
    own mixed-batch forward (``adapter_names``) for two LoRA adapters and base rows."""
    import torch

    from adapters.methods import lora_fused
    from adapters.methods.lora_fused import ROW_SEGMENTS

    a, b = group["lora_a"], group["lora_b"]
    model = a.group.model
    tuner = model.adapter_state["peft"].base_model
    ids = model.tokenizer(PROMPTS[:1] * 5, return_tensors="pt")["input_ids"]
    names = [a.handle, a.handle, b.handle, "__base__", "__base__"]
    calls = []
    real = lora_fused._segmented
    lora_fused._segmented = lambda *args: calls.append(real(*args)) or calls[-1]
    with torch.inference_mode(), a.group.lock:
        tuner.enable_adapter_layers()
        training, tuner.training = tuner.training, False
        with tuner._enable_peft_forward_hooks(adapter_names=names):
            theirs = model.backbone(input_ids=ids).logits
        tuner.training = training
        with a.adapter.route(
            model, [(a.handle, torch.tensor([1, 1, 0, 0, 0]).bool()), (b.handle, torch.tensor([0, 0, 1, 0, 0]).bool())]
        ):
            assert ROW_SEGMENTS.get() == ((a.handle, 0, 2), (b.handle, 2, 3))
            ours = model.backbone(input_ids=ids).logits
    tolerance = 1e-5 if ours.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    assert not torch.allclose(ours[0], ours[2]) and not torch.allclose(ours[2], ours[3])


def _generate(member, prompt_ids, sampling, new_tokens=NEW_TOKENS):
    """``member``'s tokens (and the sequence) for one request through the scheduler, alone."""
    done = threading.Event()
    seq = Sequence(member, prompt_ids, new_tokens, lambda piece, finish: finish and done.set(), sampling)
    Scheduler(member.group).submit(seq)
    assert done.wait(60)
    return seq


def _reference(path, prompt_ids, new_tokens, adjust, eos):
    """Greedy decoding with the whole sequence recomputed every step (no cache, no batch), the logits changed
    by ``adjust(logits, generated)`` as the setting is defined."""
    model = adapters.load(path)
    ids, generated = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model.backbone(input_ids=torch.tensor([ids])).logits[0, -1].float()
            token = int(adjust(logits, generated).argmax())
            if token in eos:
                break
            ids.append(token)
            generated.append(token)
    return generated


def _counts(generated, size):
    return torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=size).float()


SETTINGS = {
    "frequency_penalty": (
        Sampling(frequency_penalty=2.0),
        lambda logits, gen: logits - 2.0 * _counts(gen, logits.shape[0]) if gen else logits,
    ),
    "presence_penalty": (
        Sampling(presence_penalty=2.0),
        lambda logits, gen: logits - 2.0 * (_counts(gen, logits.shape[0]) > 0).float() if gen else logits,
    ),
    "repetition_penalty": (Sampling(repetition_penalty=3.0), None),  # transformers' own processor, below
    "logit_bias": (
        Sampling(logit_bias=((7, 5.0),)),
        lambda logits, gen: logits + 5.0 * (torch.arange(len(logits)) == 7),
    ),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_each_setting_changes_the_tokens_as_its_definition_does(group, name):
    from transformers import RepetitionPenaltyLogitsProcessor

    member = group["base"]
    prompt = member.group.model.tokenizer(PROMPTS[1])["input_ids"]
    sampling, adjust = SETTINGS[name]
    if adjust is None:
        penalty = RepetitionPenaltyLogitsProcessor(3.0)
        adjust = lambda logits, gen: penalty(torch.tensor([prompt + gen]), logits[None])[0]  # noqa: E731
    eos = Scheduler(member.group).eos
    served = _generate(member, prompt, sampling).generated
    assert served == _reference(member.path, prompt, NEW_TOKENS, adjust, eos)
    assert served != _generate(member, prompt, Sampling()).generated  # the setting does change the answer


def test_min_tokens_ignore_eos_and_stop_token_ids(group):
    member = group["lora_a"]
    prompt = member.group.model.tokenizer(PROMPTS[0])["input_ids"]
    plain = _generate(member, prompt, Sampling(), 40).generated  # ends at the end of text, before 40
    assert len(plain) < 40
    assert len(_generate(member, prompt, Sampling(ignore_eos=True), 40).generated) == 40
    assert len(_generate(member, prompt, Sampling(min_tokens=len(plain) + 2), 40).generated) >= len(plain) + 2
    stopped = _generate(member, prompt, Sampling(stop_token_ids=(plain[1],)), 40).generated
    assert stopped == plain[:1]


@pytest.mark.parametrize("chunk", [None, 3], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", ["lora_a", "bottleneck"])
def test_served_logprobs_equal_the_in_process_models_log_softmax(group, name, chunk, monkeypatch):
    """Prompt logprobs (``echo``) and each generated token's, from the scheduler's forwards (the prompt whole or
    prefilled in chunks), equal one forward of the artifact loaded alone: LoRA and bottleneck, fp32 and NF4."""
    if chunk:
        monkeypatch.setattr(scheduling, "PREFILL_CHUNK", chunk)
    member = group[name]
    prompt = member.group.model.tokenizer(PROMPTS[1])["input_ids"]
    seq = _generate(member, prompt, Sampling(logprobs=3, prompt_logprobs=3), 4)
    ids = prompt + seq.generated
    model = adapters.load(member.path)
    with torch.no_grad():
        reference = torch.log_softmax(model.backbone(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(reference[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    served = [e.logprob for e in seq.prompt_logprobs] + [e.logprob for e in seq.logprobs[: len(seq.generated)]]
    assert served == pytest.approx(expected, abs=1e-4)
    top = seq.logprobs[0].top
    assert [t for t, _ in top] == reference[len(prompt) - 1].topk(3).indices.tolist()


def test_a_row_whose_settings_fail_leaves_alone_and_the_batch_goes_on(group):
    """A row whose own step raises (here a grammar that fails) ends with the error; the rows beside it in the
    same batch finish with the texts they would have alone."""

    class Failing:
        def restrict(self, scores):
            raise RuntimeError("boom")

    member = group["lora_a"]
    ids = member.group.model.tokenizer(PROMPTS[0])["input_ids"]
    finished, texts, done = {}, {"ok": ""}, threading.Event()

    def emit_for(key):
        def emit(piece, finish):
            if piece is not None:
                texts[key] = texts.get(key, "") + piece
            else:
                finished[key] = finish
                if len(finished) == 2:
                    done.set()

        return emit

    scheduler = Scheduler(member.group)
    member.group.lock.acquire()  # both wait, then are prefilled and decoded as one batch
    scheduler.submit(Sequence(member, ids, NEW_TOKENS, emit_for("broken"), grammar=Failing()))
    scheduler.submit(Sequence(member, ids, NEW_TOKENS, emit_for("ok")))
    member.group.lock.release()
    assert done.wait(60)
    assert finished["broken"] == "error: RuntimeError: boom" and finished["ok"] in ("stop", "length")
    assert texts["ok"] == _alone(member, PROMPTS[0])
