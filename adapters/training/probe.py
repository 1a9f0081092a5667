"""Linear probing before fine-tuning (LP-FT): the new head starts fitted, not random.

Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution"
(ICLR 2022): a randomly initialised head sends large, noisy gradients into the adapter while it is
still wrong, and a short run (tens of steps, as on a CPU) ends before the head has learned much at
all. Fitting the head first on the frozen model's own features, then fine-tuning everything, starts
training from the best linear classifier those features allow.

``fit_head(model, loader, accelerator)``: one inference pass over the training rows records what the
head's last linear layer (``head.score``) reads, then full-batch L-BFGS fits that layer's weights and
bias to the head's own loss (class weights, label smoothing, pooling of windows and choices included)
with a small L2 penalty. Nothing else changes; the adapter starts where it was. The cost is one
forward pass over the training data without gradients, about a third of an epoch.
"""

from __future__ import annotations

import torch

from adapters.backbone.loading import eval_mode
from adapters.errors import ConfigError
from adapters.heads.layers import SequenceHead

#: L2 penalty on the standardized weights (sum of squares): keeps separable classes from running the
#: logits off to infinity while hardly biasing a fit on hundreds of rows
PROBE_L2 = 1e-2
TOKENS = ("input_ids", "attention_mask", "token_type_ids", "labels")  # what the probe does not cache
PROBE_ITERATIONS = 200


def check_probe(model) -> None:
    """A probe needs a head whose output is a linear layer over one pooled vector per text (or choice)."""
    if not isinstance(model.head, SequenceHead):
        kind = model.head_spec.kind
        raise ConfigError(
            f"linear_probe=True fits a linear head over pooled features (classification, multi-label, "
            f"regression, multiple choice with scoring='head'); this {kind} head has none to fit. "
            f"Leave linear_probe off for it"
        )


def fit_head(model, loader, accelerator, progress: bool = False) -> dict[str, float]:
    """Fit ``model.head.score`` on the frozen features of ``loader``'s rows; the loss before and after.

    ``model`` is the unwrapped ``AdaptedModel`` and ``loader`` this process's own rows, unprepared: under
    several processes each reads its share and all fit the same head on the rows of all of them."""
    batches = _features(model, loader, accelerator.device, progress and accelerator.is_local_main_process)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        batches = gather_object(batches)
    return _fit(model.head.score, model.head_spec, batches)


def _features(model, loader, device, progress: bool) -> list[dict]:
    """Per batch: the rows ``head.score`` read, and what turns its outputs into the loss (labels, windows, choices)."""
    from tqdm.auto import tqdm

    seen: list[torch.Tensor] = []
    hook = model.head.score.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().float().cpu()))
    batches = []
    try:
        with eval_mode(model), torch.no_grad():  # not inference_mode: the fit backpropagates through these
            for batch in tqdm(loader, desc="linear probe", disable=not progress):
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
                # what the head's regroup reads besides the outputs: the batch's layout, not its tokens
                layout = {k: v.cpu() for k, v in batch.items() if k not in TOKENS}
                layout["input_ids"] = batch["input_ids"][..., :1].cpu()  # its shape says how rows group
                batches.append({"features": torch.cat(seen), "labels": batch["labels"].cpu(), "layout": layout})
                seen.clear()
    finally:
        hook.remove()
    return batches


def _fit(score: torch.nn.Linear, spec, batches: list[dict]) -> dict[str, float]:
    """L-BFGS on the standardized features from the layer's current weights; the result folded back."""
    features = torch.cat([b["features"] for b in batches])
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    weight = (score.weight.detach().float() * std).clone().requires_grad_(True)
    bias = (
        (score.bias.detach().float() + score.weight.detach().float() @ mean).clone().requires_grad_(True)
        if score.bias is not None
        else None
    )
    total = sum(len(b["labels"]) for b in batches)

    def loss_of(w, b) -> torch.Tensor:  # the mean loss per row over all batches
        summed = sum(
            (_batch_loss(spec, batch, w, b, mean, std) * len(batch["labels"]) for batch in batches), torch.zeros(())
        )
        return summed / total

    with torch.no_grad():
        before = float(loss_of(weight, bias))
    params = [weight] + ([bias] if bias is not None else [])
    optimizer = torch.optim.LBFGS(params, max_iter=PROBE_ITERATIONS, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = loss_of(weight, bias) + PROBE_L2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        after = float(loss_of(weight, bias))
        folded = weight / std
        score.weight.copy_(folded.to(score.weight.dtype))
        if bias is not None:
            score.bias.copy_((bias - folded @ mean).to(score.bias.dtype))
    return {"probe_loss_before": before, "probe_loss_after": after, "probe_rows": total}


def _batch_loss(spec, batch: dict, weight, bias, mean, std) -> torch.Tensor:
    """The head's loss of one cached batch, the way ``AdaptedModel.forward`` forms it."""
    logits = torch.nn.functional.linear((batch["features"] - mean) / std, weight, bias)
    return spec.loss(spec.regroup(logits, batch["layout"]), batch["labels"])
