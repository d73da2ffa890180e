"""Run-once-and-share across the processes of a run: work every process needs but only one should do (stat 600,000
image files, hash a 3 GB cache, encode 15,000 reports) runs on the main process and its result is sent to the others.

With no accelerator or one process these are plain calls. With several, every process must call them in the same
order (they are collectives).
"""
from __future__ import annotations

from accelerate.utils import broadcast_object_list


def _world(accelerator) -> int:
    return 1 if accelerator is None else accelerator.num_processes


def is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def main_first(accelerator, fn, what: str = "failed"):
    """``fn()`` on the main process, its (picklable) result sent to every process; when it fails, every process
    raises (none is left waiting at a barrier), the others with "the main process ``what``: <its error>"."""
    error = result = None
    if is_main(accelerator):
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other processes are told
            error = err
    if _world(accelerator) > 1:
        box = [("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", result)]
        broadcast_object_list(box)
        if error is None and box[0][0] == "error":
            raise RuntimeError(f"the main process {what}: {box[0][1]}")
        result = box[0][1]
    if error is not None:
        raise error
    return result


def all_gather_objects(accelerator, obj) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    if _world(accelerator) == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(accelerator, obj) -> list | None:
    """Every process's ``obj`` in rank order on the main process (None elsewhere): the big results of a sharded
    evaluation need not be held by every process."""
    if _world(accelerator) == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * accelerator.num_processes if accelerator.is_main_process else None
    dist.gather_object(obj, out, dst=0)
    return out
