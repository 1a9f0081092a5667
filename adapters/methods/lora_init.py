"""Where LoRA's ``A`` and ``B`` start: peft's initialisations, chosen with ``LoRA(init=...)``.

* ``"default"``: peft's own (``init_lora_weights=True``): ``A`` Kaiming-uniform, ``B = 0``, so the adapted
  model starts equal to its base (Hu et al. 2021).
* ``"gaussian"``: ``A`` Gaussian with standard deviation ``1 / r``, ``B = 0`` (peft's ``"gaussian"``).
* ``"eva"``: EVA (Paischer et al. 2024, "One initialization to rule them all", arXiv:2410.07170): ``A`` starts
  as the top right-singular vectors of each layer's inputs on the first training rows (``EVA_ROWS``), ``B = 0``,
  so the update starts in the directions the task's data varies most. peft's ``initialize_lora_eva_weights``,
  run by ``train`` on a fresh run (a resumed one keeps its checkpoint), with every rank on the same rows; the
  rank stays ``r`` in every layer (``rho=1``), so the artifact keeps LoRA's shapes.
* ``"loftq"``: LoftQ (Li et al. 2023, "LoftQ: LoRA-fine-tuning-aware quantization", arXiv:2310.08659), for
  NF4/FP4 bases: the update ``(alpha / r) B A`` starts as the best rank-``r`` approximation of what 4-bit
  quantization lost, ``W - dequantize(quantize(W))`` (the one-step LoftQ of peft's
  ``replace_lora_weights_loftq``: an SVD of that residual), so the adapted model starts closer to the
  unquantized base than the quantized base itself is. It reads the base's unquantized weights (its
  safetensors files) one at a time.

Not peft's function itself, for three reasons: its arithmetic (``_loftq_init_new``) runs only on CUDA or XPU
(the device is hard-coded), it leaves LoRA's ``alpha / r`` scaling out of the start (peft#1982: with the
default ``alpha = 2r`` the update would be twice the error it corrects), and it looks weights up by the
names of a model with an LM head (``model.layers...``), which a classifier's headless backbone lacks. The
start is tested to be the Eckart-Young optimum of the scaled residual.

* ``"pissa"``: PiSSA (Meng et al. 2024, arXiv:2404.02948): ``B A`` starts as the top-``r`` singular part of ``W``
  and the frozen weight becomes the residual ``W - (alpha / r) B A`` (peft's ``init_lora_weights="pissa"``).
* ``"olora"``: OLoRA (Büyükakyüz 2024, arXiv:2406.01775): the same with the QR decomposition of ``W``.

Both rewrite the frozen base, so an artifact, which records an unchanged base, holds their update converted
by peft (``save_pretrained(path_initial_model_for_weight_conversion=...)``): ``B A - B_0 A_0`` as a plain LoRA of
rank ``2r`` (``[B | -B_0] [A ; A_0]``, ``alpha`` doubled), which ``load``, PEFT and the server apply to the
original base. On a quantized base the residual would be quantized again (QPiSSA), which is not built: refused
before loading, as is the sharded FSDP load, whose weights arrive after the adapter layers. CorDA builds its
start from calibration data before the LoRA layers exist (peft's ``preprocess_corda``), which ``adapt`` does
not do: refused by name.
"""

from __future__ import annotations

from typing import Any

import torch

from adapters.backbone.signature import takes
from adapters.errors import ConfigError

PEFT_INIT: dict[str, Any] = {
    "default": True,
    "gaussian": "gaussian",
    "loftq": True,
    "eva": "eva",
    "pissa": "pissa",
    "olora": "olora",
}
EVA_ROWS = 256  # training rows whose layer inputs EVA decomposes (peft stops early once the components settle)
REWRITE_THE_BASE = ("pissa", "olora")
FOUR_BIT = ("nf4", "fp4")


def check_init(init: Any) -> None:
    """``init`` is one LoRA can start from, else a ``ConfigError`` naming the choices."""
    if init == "corda":
        raise ConfigError(
            "LoRA init='corda' builds its start from calibration data before the LoRA layers exist (peft's "
            "preprocess_corda), which adapt() does not do; use init='eva' (also from the data) or 'pissa'"
        )
    if init not in PEFT_INIT:
        raise ConfigError(f"LoRA init={init!r} is not one of {sorted(PEFT_INIT)}")


def check_load(init: str, quantization: str | None, fsdp: bool) -> None:
    """Before loading: LoftQ starts from what 4-bit quantization lost (an NF4 or FP4 base); PiSSA and OLoRA
    rewrite the frozen weights, which must be unquantized and whole when the LoRA layers are made."""
    if init == "loftq" and quantization not in FOUR_BIT:
        raise ConfigError(
            f"LoRA init='loftq' corrects 4-bit quantization error: use quantization='nf4' or 'fp4' "
            f"(got {quantization!r}), or init='default'"
        )
    if init in REWRITE_THE_BASE and quantization is not None:
        raise ConfigError(
            f"LoRA init={init!r} rewrites the frozen weights as their residual, which a {quantization} base would "
            "quantize again (QPiSSA, not built): use quantization=None, or init='loftq' on a 4-bit base"
        )
    if init in REWRITE_THE_BASE and fsdp:
        raise ConfigError(
            f"LoRA init={init!r} decomposes whole weights when its layers are made, before a sharded load "
            "(fsdp=True) has read them: use fsdp=False, or another init"
        )


def rewrites_the_base(init: str) -> bool:
    """PiSSA and OLoRA: the frozen weights become a residual, and an artifact holds the converted update."""
    return init in REWRITE_THE_BASE


def loftq(peft_model: Any, base_location: str) -> int:
    """Every 4-bit LoRA layer of ``peft_model`` started from LoftQ (module docstring); returns how many."""
    from peft.tuners.lora import Linear4bit

    from adapters.backbone.loading import weights_folder
    from adapters.backbone.weight_files import WeightFiles

    folder = weights_folder(base_location)
    if folder is None:
        raise ConfigError(f"LoRA init='loftq' reads the base's unquantized weights: {base_location!r} has none here")
    files = WeightFiles(folder)
    done = 0
    try:
        for name, module in peft_model.named_modules():
            if not isinstance(module, Linear4bit):
                continue
            weight = files.whole(_file_name(files, name.removeprefix("base_model.model.")))
            if not weight.is_floating_point():
                raise ConfigError(f"LoRA init='loftq' needs unquantized weights; {base_location!r} is pre-quantized")
            for adapter in module.lora_A:
                _start(module, adapter, weight)
            done += 1
    finally:
        files.close()
    return done


def decomposition_bytes(linears: list[tuple[int, int]]) -> int:
    """What LoftQ's ``_start`` holds at its peak for the largest of ``linears`` (``(out, in)``), all fp32: the
    weight read, its dequantized copy and their difference, the difference scaled, and the SVD's factors ``U``,
    ``Vh`` and LAPACK's copy and workspace (about ``3 k^2`` for ``k = min(out, in)``). One weight at a time:
    the largest sets the peak. PiSSA's SVD and OLoRA's QR of one fp32 weight hold less: a bound for them."""
    return max((4 * (4 * o * i + min(o, i) * (o + i + 3 * min(o, i))) for o, i in linears), default=0)


@torch.no_grad()
def _start(module: Any, adapter: str, weight: torch.Tensor) -> None:
    """``B A`` of ``adapter`` in 4-bit LoRA layer ``module``: the best rank-``r`` approximation of the quantization
    error ``W - dequantize(W_4bit)``, divided by the layer's ``alpha / r`` scaling so that the update the layer
    adds is that approximation (peft's own LoftQ leaves the scaling out: peft#1982)."""
    import bitsandbytes as bnb

    quantized = module.weight
    lost = weight.to(quantized.device, torch.float32) - bnb.functional.dequantize_4bit(
        quantized.data, quantized.quant_state
    ).to(torch.float32)
    rank = module.r[adapter]
    u, s, vh = torch.linalg.svd(lost / module.scaling[adapter], full_matrices=False)
    root = s[:rank].sqrt()
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    a.data = (root[:, None] * vh[:rank]).to(a.dtype)
    b.data = (u[:, :rank] * root).to(b.dtype)


def eva_config() -> Any:
    """peft's EVA settings here: the rank kept at ``r`` (``rho=1``), every real token used (our labels are
    targets, not a token mask)."""
    from peft import EvaConfig

    return EvaConfig(rho=1.0, use_label_mask=False)


def eva(peft_model: Any, batches: list[dict[str, torch.Tensor]]) -> None:
    """EVA's start for every LoRA layer of ``peft_model`` from ``batches`` (``input_ids``, ``attention_mask``)."""
    from peft import initialize_lora_eva_weights

    # EVA reads the layers' inputs only: a causal LM projects one position onto its vocabulary, not every one
    # (SmolLM2-135M in NF4, a batch of 8 x 900 tokens: 1.4 GB of logits less, a forward 1.15x faster; the
    # legal assistant's EVA start took 739 s before, with other work on the CPU)
    keep = {"logits_to_keep": 1} if takes(peft_model, "logits_to_keep") else {}

    def forward(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **keep)

    # peft's own bar: on long rows (the legal assistant's 960-token conversations) the start takes minutes
    initialize_lora_eva_weights(
        peft_model, dataloader=batches, forward_fn=forward, gather_distributed_inputs=False, show_progress_bar=True
    )


def padded_batches(rows: list[list[int]], pad: int, size: int, device: Any) -> list[dict[str, torch.Tensor]]:
    """``rows`` of token ids as right-padded batches of ``size`` with their attention masks."""
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(len(r) for r in chunk)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _file_name(files: Any, module: str) -> str:
    """The weight file's name of ``module``'s weight: as it is, under the LM model's ``model.`` prefix, or
    without the first component (a headless backbone saved with a prefix of its own)."""
    for candidate in (f"{module}.weight", f"model.{module}.weight", f"{module.partition('.')[2]}.weight"):
        if candidate in files:
            return candidate
    raise ConfigError(f"LoRA init='loftq': no weight for {module!r} in the base's files")
