"""Two gloo processes: identical queues in rank order, and the DDP shuffle undone exactly."""

import functools
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import free_port

from benchmarks.core.diagnostics import CopyCounter
from model import MoCo, build_encoder
from model.distributed import concat_all_gather

BATCH, K, STEPS = 8, 64, 3


def _worker(rank, world_size, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(0)  # identical initial weights and queue on every rank, as DDP requires
    moco = MoCo(functools.partial(build_encoder, "resnet_mini_cifar"), dim=16, K=K, shuffle="ddp")
    model = torch.nn.parallel.DistributedDataParallel(moco, broadcast_buffers=False)
    optimizer = torch.optim.SGD(moco.parameters(), lr=0.1)

    enqueued = []
    original_enqueue = moco._dequeue_and_enqueue
    moco._dequeue_and_enqueue = lambda keys: (enqueued.append(keys.clone()), original_enqueue(keys))

    torch.manual_seed(100 + rank)  # each rank sees different images
    for _ in range(STEPS):
        logits, labels = model(torch.randn(BATCH, 3, 8, 8), torch.randn(BATCH, 3, 8, 8))
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()

    x = torch.randn(BATCH, 3, 8, 8)
    shuffled, idx_unshuffle = moco._batch_shuffle_ddp(x)
    round_trip = moco._batch_unshuffle_ddp(shuffled, idx_unshuffle)
    # Frozen and identical BN on both ranks: a shuffled forward must then give the same keys as a direct one.
    moco.encoder_k.eval()
    for buffer in moco.encoder_k.buffers():
        dist.broadcast(buffer, src=0)
    keys_shuffled_bn = moco._compute_keys(x)
    keys_direct = F.normalize(moco.encoder_k(x), dim=1)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with CopyCounter() as copies:
        gathered_cl = concat_all_gather(x_cl)
        shuffled_cl, _ = moco._batch_shuffle_ddp(x_cl)
    layouts = dict(
        gathered=gathered_cl.is_contiguous(memory_format=torch.channels_last),
        shuffled=shuffled_cl.is_contiguous(memory_format=torch.channels_last),
        copies=[row["op"] for row in copies.rows() if row["op"] != "index"],
    )
    torch.save(
        dict(
            gathered_cl=gathered_cl,
            layouts=layouts,
            shuffle_mode=moco.shuffle,
            queue=moco.queue,
            ptr=int(moco.queue_ptr),
            enqueued=enqueued,
            x=x,
            shuffled=shuffled,
            round_trip=round_trip,
            keys_shuffled_bn=keys_shuffled_bn,
            keys_direct=keys_direct,
        ),
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


def test_two_process_queue_and_shuffle(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["shuffle_mode"] == "ddp"
    torch.testing.assert_close(r0["queue"], r1["queue"], rtol=0, atol=0)
    assert r0["ptr"] == r1["ptr"] == (STEPS * 2 * BATCH) % K
    for step in range(STEPS):  # each step enqueues rank 0's keys, then rank 1's
        start = step * 2 * BATCH
        torch.testing.assert_close(r0["queue"][:, start : start + BATCH], r0["enqueued"][step].T)
        torch.testing.assert_close(r0["queue"][:, start + BATCH : start + 2 * BATCH], r1["enqueued"][step].T)
    for r in (r0, r1):
        # a channels_last batch is gathered as it lies: no conversion to NCHW and back, only the shuffle's gather
        assert torch.equal(r["gathered_cl"], torch.cat([r0["x"], r1["x"]]))
        assert r["layouts"] == dict(gathered=True, shuffled=True, copies=[])
        assert torch.equal(r["round_trip"], r["x"])
        torch.testing.assert_close(r["keys_shuffled_bn"], r["keys_direct"], rtol=1e-5, atol=1e-6)
    # the shuffle really moves images across ranks: some of rank 0's keys were computed on rank 1
    both = torch.cat([r0["x"], r1["x"]])
    assert not torch.equal(torch.cat([r0["shuffled"], r1["shuffled"]]), both)
