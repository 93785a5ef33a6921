"""Where each step's data and randomness come from, on one process or under ``torchrun``.

The data order is a chain of per-epoch permutations and every step's ``t``, ``eps``, flips and
label drops come from a generator seeded by ``(seed, step)`` for the *global* batch. Under
``torchrun`` each rank takes its contiguous slice, so N processes see exactly the batch one
process would; DDP averages the per-rank mean losses' gradients, which is the gradient of the
global mean. A resumed run needs only the step count to draw the same batches.
"""
import functools
import os

import numpy as np

from bdm_runtime.errors import BdmError

# -- distributed --------------------------------------------------------------------------------
class Dist:
    """Rank and world size; initialises torch.distributed when launched by ``torchrun``."""

    def __init__(self, device_opt):
        import torch

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = "RANK" in os.environ and self.world > 1
        self.device = self._device(device_opt)
        if self.device.type == "cuda":  # else every rank's NCCL communicator and barrier use cuda:0
            torch.cuda.set_device(self.device)
        if self.enabled:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _device(self, opt):
        import torch

        if opt == "auto":
            opt = "cuda" if torch.cuda.is_available() else "cpu"
        if opt.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BdmError("--device cuda, but this torch sees no CUDA device")
            if opt == "cuda":
                return torch.device("cuda", self.local_rank if self.enabled else torch.cuda.current_device())
            if torch.device(opt).index >= torch.cuda.device_count():
                raise BdmError(f"--device {opt}, but this torch sees {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(opt)

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self):
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# -- the per-step randomness --------------------------------------------------------------------
def derived_seed(seed, stream, k):
    """A 63-bit seed for stream ``stream`` (0: epochs, 1: batch noise, 2: dropout) at index ``k``."""
    a, b = np.random.SeedSequence([int(seed), int(stream), int(k)]).generate_state(2, np.uint32)
    return (int(a) << 31) ^ int(b)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed, epoch, n):
    """The data order of one epoch."""
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, 0, epoch)))


def batch_indices(seed, step, n, batch_size):
    """Global batch ``step``: positions ``[step*B, (step+1)*B)`` of the chained epoch permutations."""
    import torch

    parts, pos, end = [], step * batch_size, (step + 1) * batch_size
    while pos < end:
        epoch, off = divmod(pos, n)
        take = min(end - pos, n - off)
        parts.append(epoch_permutation(seed, epoch, n)[off:off + take])
        pos += take
    return torch.cat(parts)


def batch_noise(seed, step, batch_size, shape):
    """``t``, ``eps``, flip mask and label-drop draw of the global batch ``step``."""
    import torch

    g = torch.Generator().manual_seed(derived_seed(seed, 1, step))
    t = torch.rand(batch_size, generator=g)
    eps = torch.randn((batch_size,) + tuple(shape), generator=g)
    flip = torch.rand(batch_size, generator=g) < 0.5
    drop = torch.rand(batch_size, generator=g)
    return t, eps, flip, drop
