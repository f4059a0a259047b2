"""Thin helpers over ``torch.distributed`` that also work when it is not initialised.

Launching with ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; :func:`init_distributed`
then joins the process group (nccl on GPU, gloo on CPU). Everything else degrades to the
single-process case, so library code can call these unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1. Returns whether distributed."""
    if is_dist():
        return True
    if not launched_by_torchrun():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown(ok: bool) -> None:
    """Leave the process group at the end of a command. After a success every rank first meets
    the others: a rank that tears its gloo sockets down while a peer still talks to it makes
    that peer abort (SIGABRT). After an error there is no barrier (the other ranks may never
    reach it); the launcher stops them."""
    if not is_dist():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where tensors must be for this process group's collectives: the rank's GPU for nccl,
    the CPU otherwise (gloo)."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (on a copy); identity when not distributed. The result has the
    input's device and dtype, whatever device the backend needs.

    gloo has no int64/uint8 reductions on some builds, so integer tensors are reduced as
    float64 (exact up to 2**53, far above any pixel count).
    """
    if not is_dist():
        return t
    orig_dtype, orig_device = t.dtype, t.device
    work = t.detach().to(comm_device(), copy=True)
    if dist.get_backend() == "gloo" or not work.is_floating_point():
        work = work.to(torch.float64)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(orig_device, orig_dtype)


def all_gather_padded(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``x`` (``n_r x ...``, ``n_r`` may differ per rank) from every rank.

    Returns ``(padded, valid)``: ``padded`` is ``world x n_max x ...`` with each rank's rows
    first and zeros after them, ``valid`` the ``world x n_max`` bool mask of real rows. Each
    rank pads to the largest count before the collective, which is what lets ranks enqueue
    different numbers of items (e.g. only confident embeddings) without a hang. The local
    rank's rows keep their autograd graph (the other ranks' rows are constants), so a loss
    over gathered embeddings still trains the local model. Cost: one host sync to learn the
    counts (a fixed-size gather would need none; unequal counts cannot avoid it).
    """
    padded, valid, _ = _gather_padded(x)
    return padded, valid


def _gather_padded(x: torch.Tensor):
    if not is_dist() or get_world_size() == 1:
        return x[None], torch.ones(1, x.shape[0], dtype=torch.bool, device=x.device), [int(x.shape[0])]
    dev = comm_device()
    n = torch.tensor([x.shape[0]], device=dev, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(get_world_size())]
    dist.all_gather(counts, n)
    counts_host = torch.cat(counts).tolist()  # the one host sync: buffer sizes depend on it
    n_max = max(counts_host)
    local = torch.cat([x, x.new_zeros((n_max - x.shape[0], *x.shape[1:]))])
    out = [torch.empty_like(local, device=dev) for _ in range(get_world_size())]
    dist.all_gather(out, local.detach().to(dev).contiguous())
    out = [o.to(x.device) for o in out]
    out[get_rank()] = local  # keeps the local rows' graph
    valid = torch.arange(n_max, device=x.device)[None] < torch.tensor(counts_host, device=x.device)[:, None]
    return torch.stack(out), valid, counts_host


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank concatenated in rank order; counts may differ per rank.
    Differentiable for the local rows (see :func:`all_gather_padded`); one host sync."""
    if not is_dist() or get_world_size() == 1:
        return x
    padded, _, counts = _gather_padded(x)
    return torch.cat([padded[r, :c] for r, c in enumerate(counts)])  # host-side counts: no further sync


def all_gather_object(obj):
    """List of ``obj`` from every rank (``[obj]`` when not distributed)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
