"""
Several processes started by ``torchrun``: where this one stands, and what they share.

The one place that reads torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) and
the one reduction the commands use; ``train`` and ``evaluate`` both go through here. Without
torchrun every helper is the identity of a world of one, and nothing imports
``torch.distributed``.
"""

from __future__ import annotations

from dataclasses import dataclass
import datetime
import functools
import os
from typing import Any

import torch


@dataclass(frozen=True)
class Distributed:
    """This process's place among the processes (a world of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Distributed:
        """Read where torchrun put this process; a world of 1 when torchrun did not start it."""
        return cls(rank=int(os.environ.get('RANK', '0')),
                   world=int(os.environ.get('WORLD_SIZE', '1')),
                   local_rank=int(os.environ.get('LOCAL_RANK', '0')))

    @property
    def main(self) -> bool:
        """Whether this is process 0, the one that writes and reports."""
        return self.rank == 0

    def device_for(self, device: str) -> str:
        """
        Return the GPU this process should use when ``device`` lets it choose.

        One GPU per process, as torchrun numbers them on a machine; anything else unchanged.
        """
        if self.world > 1 and device in ('auto', 'cuda') and torch.cuda.is_available():
            return f'cuda:{self.local_rank % torch.cuda.device_count()}'
        return device

    def start(self, backend: str, timeout_s: float | None = None) -> None:
        """Join the process group (nothing in a world of 1); loopback rendezvous by torchrun."""
        if self.world == 1:
            return
        import torch.distributed as dist
        timeout = {} if timeout_s is None else {'timeout': datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, **timeout)

    def finish(self) -> None:
        """Leave the process group (nothing in a world of 1)."""
        if self.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()

    def sum_across(self, value: float) -> float:
        """Return ``value`` summed over every process (a mean is this over ``world``)."""
        if self.world == 1:
            return value
        import torch.distributed as dist
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return float(tensor.item())

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Return every process's ``value`` in rank order in process 0; None in the others."""
        if self.world == 1:
            return [value]
        import torch.distributed as dist
        gathered: list[Any] | None = [None] * self.world if self.main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered


def synchronise_batch_norm(model: torch.nn.Module) -> None:
    """
    Make every BatchNorm of ``model`` normalise training batches by all processes' statistics.

    Without it each process normalises by its own share of the batch, so N processes train a
    different model than one (measured on a temporal model: weights 20-90% of a 1-epoch update
    apart). torch's SyncBatchNorm does this on GPUs only; here the sums travel by
    ``torch.distributed.nn.all_reduce``, which carries gradients back, on any backend. The
    modules and their state_dict keys stay as they are: only these instances' forward changes.
    """
    import torch.distributed as dist
    # A group of their own: DistributedDataParallel reduces gradient buckets on the default
    # group while the backward pass runs, and gloo pairs each group's calls in issue order.
    group = dist.new_group()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.forward = functools.partial(_synchronised_batch_norm, module, group)


def _synchronised_batch_norm(norm: torch.nn.modules.batchnorm._BatchNorm, group: Any,
                             inputs: torch.Tensor) -> torch.Tensor:
    if not norm.training or not norm.track_running_stats:
        return type(norm).forward(norm, inputs)
    from torch.distributed.nn import all_reduce
    axes = [0] + list(range(2, inputs.dim()))
    values = inputs.float()
    channels = inputs.shape[1]
    shape = [1, channels] + [1] * (inputs.dim() - 2)
    count = values.new_tensor([values.numel() / max(channels, 1)])
    totals = all_reduce(torch.cat([values.sum(axes), count]), group=group)
    frames = totals[-1]
    mean = totals[:channels] / frames
    # Two passes, as BatchNorm itself computes it: the mean of squares minus the squared
    # mean loses the digits that tell small batches apart.
    centred = values - mean.view(shape)
    variance = all_reduce((centred * centred).sum(axes), group=group) / frames
    with torch.no_grad():
        momentum = norm.momentum if norm.momentum is not None else 0.1
        norm.running_mean.lerp_(mean.detach(), momentum)
        norm.running_var.lerp_(variance.detach() * frames / (frames - 1).clamp_min(1), momentum)
        norm.num_batches_tracked += 1
    normalised = centred * torch.rsqrt(variance.view(shape) + norm.eps)
    if norm.affine:
        normalised = normalised * norm.weight.view(shape) + norm.bias.view(shape)
    return normalised.to(inputs.dtype)
