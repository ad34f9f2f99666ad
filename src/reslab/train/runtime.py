"""Where and how training runs: device, mixed precision, memory format, seeds and DistributedDataParallel.

DDP: launched by ``torchrun``, which sets RANK / WORLD_SIZE / LOCAL_RANK; gloo on the CPU, nccl on GPUs.
Each rank reads its own shard of the data; rank 0 alone writes logs and checkpoints.

A user error on one rank must end every rank alike (issue 8): a rank that raises and exits leaves the others
in their next collective, where they die with a transport traceback or wait for the 30-minute timeout. Work
that may fail on some ranks only (reading files, writing them on rank 0) runs inside ``shared_errors``, which
lets every rank raise the same error; the CLI prints it on rank 0 alone (``is_shared``).
"""

from __future__ import annotations

import os
import pickle
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from reslab.device import pick_amp, pick_device
from reslab.errors import ReslabError

T = TypeVar("T")
_SHARED = "reslab_raised_on_every_rank"  # set on an error that shared_errors raised on every rank
_joined_group = False  # whether this process joined a process group; until then every rank runs the same code


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for float32
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str, amp: str, channels_last: bool | None) -> Runtime:
    """Resolve "auto" settings and join the process group when launched by torchrun."""
    global _joined_group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda" and world_size > 1:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    _joined_group = _joined_group or dist.is_initialized()
    if channels_last is None:
        # Measured (README, benchmarks/memory_format.py): NHWC is never slower on this CPU with oneDNN, and
        # it is the tensor-core layout on NVIDIA GPUs.
        channels_last = dev.type in ("cpu", "cuda")
    return Runtime(
        device=dev,
        amp_dtype=pick_amp(amp, dev),
        channels_last=channels_last,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
    )


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that a run repeats exactly on the CPU."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (a no-op without a process group)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_rng_states(rt: Runtime) -> dict[str, list]:
    """Every rank's global RNG states (CPU and CUDA), gathered to all ranks, indexed by rank."""
    state = {"torch": torch.get_rng_state()}
    if rt.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    if not rt.distributed:
        return {k: [v] for k, v in state.items()}
    gathered: list[Any] = [None] * rt.world_size
    dist.all_gather_object(gathered, state)
    return {k: [g[k] for g in gathered] for k in state}


def restore_rng_states(states: dict[str, list], rt: Runtime) -> None:
    """This rank's states from ``gather_rng_states``; with another number of processes the fresh seeds stay."""
    if len(states.get("torch", [])) != rt.world_size:
        return  # a different number of processes: keep the fresh seeds
    torch.set_rng_state(states["torch"][rt.rank])
    if rt.device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"][rt.rank], rt.device)


@contextmanager
def shared_errors(rt: Runtime) -> Iterator[None]:
    """Run a block on every rank; when it fails on any rank, every rank raises the same error.

    After the block the ranks exchange how it went (one ``all_gather_object``). The first failing rank (the
    lowest) decides: its ``ReslabError`` or ``OSError`` is raised on every rank; any other exception is raised
    with its traceback on the rank that had it, and as a one-line ``ReslabError`` naming that rank on the others.
    ``is_shared`` is True for what every rank raised. KeyboardInterrupt and SystemExit pass through at once.

    Every rank must enter the block (it is a collective), and the block itself must not run collectives: a
    rank that fails inside would skip them and leave the others waiting. A no-op outside DDP.
    """
    if not rt.distributed:
        yield
        return
    error: Exception | None = None
    try:
        yield
    except Exception as err:  # every rank must learn of any failure; it is raised again below
        error = err
    outcomes: list = [None] * rt.world_size
    dist.all_gather_object(outcomes, _outcome(error))
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return
    first_rank, (user_error, payload) = failed[0]
    if error is not None and not _is_user_error(error):
        raise error  # a bug keeps its traceback on the rank it happened on
    if user_error:
        shared = error if first_rank == rt.rank else payload
    else:
        shared = ReslabError(f"rank {first_rank} failed: {payload} (see that rank's traceback)")
    setattr(shared, _SHARED, True)
    raise shared


def on_every_rank(fn: Callable[[], T], rt: Runtime) -> T:
    """``fn()`` on rank 0 first, then on the other ranks; an error on any rank is raised on every rank.

    For loading data: rank 0 may download what the others then read. Each half runs in ``shared_errors``,
    so ``fn`` must not run collectives. Outside DDP it is just ``fn()``.
    """
    if not rt.distributed:
        return fn()
    result = None
    with shared_errors(rt):
        if rt.is_main:
            result = fn()
    with shared_errors(rt):
        if not rt.is_main:
            result = fn()
    return result


def is_shared(err: BaseException) -> bool:
    """Whether every rank raised ``err`` too, so rank 0's report of it speaks for all of them.

    True for what ``shared_errors`` raised, and for any error from before this process joined the process
    group: until then every rank runs the same code on the same command line.
    """
    return getattr(err, _SHARED, False) or not _joined_group


def _is_user_error(err: BaseException) -> bool:
    return isinstance(err, (ReslabError, OSError))  # OSError: a full disk, a folder that cannot be written


def _outcome(err: Exception | None) -> tuple[bool, object] | None:
    """What the other ranks learn of this rank's failure: (True, the error) for a user error that survives
    pickling, else (False, "TypeName: message")."""
    if err is None:
        return None
    if _is_user_error(err):
        try:
            pickle.loads(pickle.dumps(err))
            return True, err
        except Exception:  # an error class that cannot travel still has its message
            return True, ReslabError(str(err))
    return False, f"{type(err).__name__}: {err}"
