"""One pass of megatron-core's pipeline schedule over a list of micro-batches.

Shared by the trainer, calibration and the sensitivity study. A micro-batch is a dict with
``tokens``, ``position_ids``, ``labels`` and ``loss_mask`` ([b, s], as ``data.batch_iterator``
yields them); the loss is the masked token mean of each micro-batch.
"""

import torch
import torch.distributed as dist


def run_microbatches(model, micro, seq_length: int, micro_batch_size: int,
                     forward_only: bool, per_microbatch: bool = False) -> float:
    """Forward (and backward unless ``forward_only``) over ``micro``; returns the mean loss.

    The returned loss is averaged over the micro-batches and the data-parallel ranks, and is
    the same on every rank (only the last pipeline stage computes it). The schedule scales
    each micro-batch's loss by ``1/len(micro)`` before backward; ``per_microbatch`` undoes
    that, so each micro-batch's gradient is that of its own token mean and does not depend on
    how micro-batches are spread over data-parallel ranks (what calibration wants).
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_espace.runtime import device

    losses = []
    scale = len(micro) if per_microbatch else 1

    def forward_step(data_iterator, model):
        batch = {key: t.to(device()) for key, t in next(data_iterator).items()}
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(out):
            mask = batch["loss_mask"]
            loss = (out.float() * mask).sum() / mask.sum().clamp_min(1)
            losses.append(loss.item())  # now: the schedule then divides `loss` in place
            return loss * scale, {"lm loss": loss.detach()}

        return output, loss_func

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
        num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=forward_only)
    total = torch.tensor([float(sum(losses)), float(len(losses))], dtype=torch.float64,
                         device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)  # last-stage ranks hold losses, each TP rank the same ones
        total /= parallel_state.get_tensor_model_parallel_world_size()
    return (total[0] / total[1].clamp_min(1)).item()


def forward_collect(model, micro, seq_length: int, micro_batch_size: int, reduce) -> list:
    """Forward-only pass over ``micro`` that keeps, per micro-batch, ``reduce(batch, logits)``.

    A micro-batch is a dict with ``tokens`` and ``position_ids`` ([b, s], every micro-batch
    the same shape). ``logits`` is this rank's vocabulary shard of the output layer,
    [b, s, V_padded / tp]. Returns the ``reduce`` results in order on the last pipeline
    stage and ``[]`` on the others.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_espace.runtime import device

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"].to(device()), batch["position_ids"].to(device()), None)
        return output, lambda logits, non_loss_data=True: reduce(batch, logits)

    return list(get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
        num_microbatches=len(micro), seq_length=seq_length, micro_batch_size=micro_batch_size,
        forward_only=True, collect_non_loss_data=True) or [])
