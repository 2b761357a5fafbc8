"""PyTorch DistributedDataParallel (gloo, CPU) on the network of bench_parallel.py: the
yardstick for dpnet's data-parallel scaling. Run with a Python that has torch:

    /path/to/torch-venv/bin/python benchmarks/torch_ddp.py --world 2

It starts `world` processes on this machine (one intra-op thread each), each training
ThreeLayerConvNet's twin (torch_reference.three_layer_convnet, no batchnorm, float32) on
its half of a global batch of 128 with Adam, and prints one JSON line: images_per_s,
step_ms, world. bench_parallel.py calls it when given --torch-python.
"""

import argparse
import json
import os
import socket
import sys
import time

STEPS, WARMUP, BATCH = 30, 5, 128


def worker(rank, world, port, out):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_reference import three_layer_convnet

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = three_layer_convnet(use_bn=False)
    if world > 1:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(rank)
    shard = BATCH // world
    X = torch.randn(shard, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (shard,), generator=generator)
    for i in range(WARMUP + STEPS):
        if i == WARMUP:
            dist.barrier()
            start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()  # DDP averages gradients over ranks
        optimizer.step()
    dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"images_per_s": BATCH * STEPS / seconds,  # every step is one global batch
                       "step_ms": 1e3 * seconds / STEPS, "world": world}, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2, help="processes (1: the whole batch in one, no DDP)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(args.world, free_port(), out), nprocs=args.world, join=True)
        with open(out) as f:
            print(f.read())


if __name__ == "__main__":
    main()
