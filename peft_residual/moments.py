"""Statistics accumulated batch by batch and summed over the processes of a ``torch.distributed`` group: the PCA
fit's per-unit moments and the class centroids of a vision-only classifier. A leaf module: it imports only torch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the processes of the default ``torch.distributed`` group, on ``tensor``'s device (the
    sum itself runs where the backend needs it: NCCL sums on the GPU)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor.device
    total = tensor.to(device, copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


class StreamingMoments:
    """Mean and scatter of ``[batch, units, dim]`` samples, merged batch by batch in float64 (Chan et al.).

    Memory is ``O(units * dim^2)`` whatever the number of samples, and merging centred batches avoids the
    cancellation of the textbook ``E[xx^T] - mu mu^T``.
    """

    def __init__(self, scatter: bool = True) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.scatter: torch.Tensor | None = None
        self._with_scatter = scatter

    def update(self, batch: torch.Tensor) -> None:
        batch = batch.double()
        n = batch.shape[0]
        batch_mean = batch.mean(0)
        if self.mean is None:
            self.mean = torch.zeros_like(batch_mean)
            if self._with_scatter:
                self.scatter = batch.new_zeros(batch.shape[1], batch.shape[2], batch.shape[2])
        delta = batch_mean - self.mean
        total = self.count + n
        if self._with_scatter:
            centred = batch - batch_mean
            self.scatter += torch.einsum("bud,bue->ude", centred, centred)
            self.scatter += torch.einsum("ud,ue->ude", delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def merge_processes(self) -> None:
        """Combine the moments of every process's own samples into those of all of them (in place, on every
        process): the counts and sums add up, and each process's scatter is moved to the common mean before the sum,
        so no process gathers another's moments."""
        local = torch.tensor(float(self.count), dtype=torch.float64, device=self.mean.device)
        total = sum_across_processes(local)
        mean = sum_across_processes(self.mean * local) / total
        if self._with_scatter:
            delta = self.mean - mean
            self.scatter = sum_across_processes(self.scatter + torch.einsum("ud,ue->ude", delta, delta) * local)
        self.mean, self.count = mean, int(total)

    def covariance(self) -> torch.Tensor:
        return self.scatter / (self.count - 1)

    def second_moment(self) -> torch.Tensor:
        """``E[x x^T]`` about zero, for an uncentred PCA."""
        return (self.scatter + self.count * torch.einsum("ud,ue->ude", self.mean, self.mean)) / self.count
