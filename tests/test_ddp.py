"""Distributed training: DistributedDataParallel and FSDP2 (``fully_shard``) over
2 CPU processes with the gloo backend give the same gradients and parameters,
after a few optimizer steps, as one process on the whole batch.

Each rank trains on its half of the global batch with a mean loss; both
wrappers average the gradients over ranks, which is the gradient of the mean
loss over the global batch. float64 keeps the comparison tight."""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from convgru_triton import ConvGRU2d

WORLD = 2
STEPS = 3
BATCH = 4  # global batch; WORLD ranks get BATCH // WORLD each

# The slow tier: two processes start, each imports torch and sets up gloo.
pytestmark = pytest.mark.slow


class Net(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.gru = ConvGRU2d(2, 4, 3, num_layers=2, reset_after=False, backend=backend, dtype=torch.float64)
        self.head = nn.Conv2d(4, 1, 1, dtype=torch.float64)

    def forward(self, x):
        output, _ = self.gru(x)
        return self.head(output.flatten(0, 1)).unflatten(0, output.shape[:2])


def _data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, BATCH, 2, 5, 5, generator=g, dtype=torch.float64)  # (T, N, C, H, W)
    y = torch.randn(2, BATCH, 1, 5, 5, generator=g, dtype=torch.float64)
    return x, y


def _train(model, params, x, y):
    """STEPS of SGD with momentum; the gradients of the last step stay in ``.grad``."""
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _single_process(backend):
    torch.manual_seed(0)
    net = Net(backend)
    x, y = _data()
    _train(net, net.parameters(), x, y)
    return {n: p.detach().clone() for n, p in net.named_parameters()}, {n: p.grad.clone() for n, p in net.named_parameters()}


def _worker(rank, port, backends, result_path):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = _data()
    shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    x, y = x[:, shard], y[:, shard]
    results = {}
    for backend in backends:
        torch.manual_seed(0)
        net = Net(backend)
        ddp = DDP(net)
        _train(ddp, ddp.parameters(), x, y)
        results[("ddp", backend)] = (
            {n: p.detach().clone() for n, p in net.named_parameters()},
            {n: p.grad.clone() for n, p in net.named_parameters()},
        )

        torch.manual_seed(0)
        net = Net(backend)
        fully_shard(net.gru)
        fully_shard(net)
        _train(net, net.parameters(), x, y)
        results[("fsdp", backend)] = (
            {n: p.full_tensor().detach().clone() for n, p in net.named_parameters()},
            {n: p.grad.full_tensor().clone() for n, p in net.named_parameters()},
        )
    if rank == 0:
        torch.save(results, result_path)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.triton_kernels
def test_ddp_and_fsdp_match_single_process(tmp_path):
    # The Triton backend on CPU tensors needs the interpreter; with a GPU the
    # tests' tensors are CUDA tensors, which these CPU/gloo processes do not use.
    backends = ["torch"] if torch.cuda.is_available() else ["torch", "triton"]
    result_path = tmp_path / "rank0.pt"
    context = mp.spawn(_worker, args=(_free_port(), backends, str(result_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the distributed workers did not finish within 120 s")
    results = torch.load(result_path)
    for backend in backends:
        params, grads = _single_process(backend)
        for wrapper in ("ddp", "fsdp"):
            dist_params, dist_grads = results[(wrapper, backend)]
            assert set(dist_params) == set(params)
            for name in params:
                torch.testing.assert_close(dist_grads[name], grads[name], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{wrapper}/{backend} grad of {name}: {m}")
                torch.testing.assert_close(dist_params[name], params[name], rtol=1e-10, atol=1e-12,
                                           msg=lambda m: f"{wrapper}/{backend} {name}: {m}")
        # The steps moved the parameters: the comparison is not one of initial values.
        torch.manual_seed(0)
        initial = Net(backend).state_dict()
        assert any(not torch.equal(initial[n], params[n]) for n in params)
