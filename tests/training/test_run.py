import weakref

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from realign_pipeline.training.run import leave_process_group


def test_leave_process_group_frees_the_ddp_wrapper_before_it_leaves_the_group(tmp_path, monkeypatch):
    # A one-process gloo group in this process, and a DDP wrapper that only the garbage collector can free
    # (a reference cycle, as a trainer's wrapper may have): its reducer must be gone while the group is
    # still registered, or the reducer's destructor is what joins gloo's threads, with the GIL held.
    destroy = dist.destroy_process_group
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        wrapper = DistributedDataParallel(torch.nn.Linear(2, 2))
        wrapper.cycle = [wrapper]
        wrapper(torch.ones(1, 2)).sum().backward()  # one all-reduce through the reducer
        wrapper_alive = weakref.ref(wrapper)
        del wrapper

        alive_when_leaving = []

        def recording_destroy(*args, **kwargs):
            alive_when_leaving.append(wrapper_alive() is not None)
            return destroy(*args, **kwargs)

        monkeypatch.setattr(dist, "destroy_process_group", recording_destroy)
        leave_process_group()
    finally:
        if dist.is_initialized():
            destroy()

    assert alive_when_leaving == [False]
    assert not dist.is_initialized()


def test_leave_process_group_without_a_group_does_nothing():
    assert not dist.is_initialized()
    leave_process_group()
    assert not dist.is_initialized()
