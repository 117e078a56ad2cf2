"""Training under torchrun: the process group, each rank's data shard, and the collectives
that keep ranks in step."""

import os

import torch


class Distributed:
    """The process's place in a torchrun job (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA.
    Each rank trains on its own shard of the training stream; rank 0 alone writes checkpoints
    and logs."""

    def __init__(self, config):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world_size > 1
        if self.active and not torch.distributed.is_initialized():
            cuda = str(config.device).startswith("cuda")
            if cuda:
                config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(config.device)
            torch.distributed.init_process_group("nccl" if cuda else "gloo")

    @property
    def is_main(self):
        return self.rank == 0

    def shard(self, ids):
        """This rank's equal-length slice of the token stream (equal, so every rank runs the
        same number of steps and the gradient all-reduces pair up)."""
        length = ids.numel() // self.world_size
        return ids[self.rank * length:(self.rank + 1) * length]

    def gather(self, value):
        """Every rank's `value` (plain Python values and CPU tensors), in rank order, on every
        rank; a one-element list outside torchrun."""
        if not self.active:
            return [value]
        values = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def any(self, flag, device):
        """Whether `flag` holds on any rank: decisions that end the loop (the time budget) must
        be the same everywhere, or the ranks that go on wait forever in the gradient
        all-reduce."""
        if not self.active:
            return bool(flag)
        value = torch.tensor([int(bool(flag))], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def close(self, finished):
        if self.active and torch.distributed.is_initialized():
            if finished:  # after a failure the other ranks may never reach a barrier
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
