"""DeepSpeed ZeRO-3 holds what FSDP2 holds, per rank: after a training step on 2 ranks, the tensors of
DeepSpeed's optimizer (the parameters' flat partition, its fp32 master groups, the gradient partitions, the
optimizer's gradient buffers, the reduction bucket, Adam's two states) add up to at most FSDP2's four
partition-sized tensors (parameters, gradients, two states) plus one block's reduction bucket and a block's
worth of slack.

DeepSpeed's defaults failed this on CPU (bench/deepspeed_memory.py measures the resident set they cost):
an fp32 master copy of the partition beside the fp32 parameters, and a reduction bucket of 5e8 values;
parallel/deepspeed.py aliases the first and sizes the buckets by a block (`zero3_buckets`)."""
import pytest

WORLD_SIZE = 2
OVERRIDES = ["parallel=deepspeed_zero3", "model.vocab_size=1024", "model.d_model=256", "model.pattern=GGGA",
             "model.n_layers=8", "train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=1",
             "logging.wandb.mode=disabled"]


def run_zero3_step(rank: int, world_size: int) -> None:
    import torch

    from configs.schema import load_config
    from parallel.deepspeed import DeepSpeedEngine
    from parallel.topology import init_topology

    cfg, _ = load_config(OVERRIDES)
    engine = DeepSpeedEngine(cfg, init_topology(cfg.parallel))
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(cfg.model.vocab_size, (1, cfg.train.seq_len + 1), generator=generator)
    loss = engine.model(tokens[:, :-1], labels=tokens[:, 1:])
    engine.backward(loss)
    engine.step(cfg.optim.lr)

    optimizer = engine.optimizer
    held = [optimizer.lp_param_buffer, optimizer.grad_partitions_flat_buffer]
    held += [bucket.buffer for bucket in optimizer.ipg_buckets.values()]
    for master in optimizer.fp32_partitioned_groups_flat:
        held += [master, master.grad]
        held += list(optimizer.optimizer.state[master].values())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held if t is not None}

    model = engine.ds.module
    partition_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    block_bytes = max(sum(p.ds_numel for p in block.parameters()) for block in model.blocks) * 4
    assert optimizer.reduce_bucket_size * 4 == block_bytes
    # Observed: the four partitions plus the bucket and a few small tensors; an fp32 master copy adds a fifth.
    assert sum(storages.values()) <= 4 * partition_bytes + 2 * block_bytes, \
        f"rank {rank}: {sum(storages.values()) / 2**20:.1f} MiB held, partition {partition_bytes / 2**20:.1f} MiB, " \
        f"block {block_bytes / 2**20:.1f} MiB"
    for master, partition in zip(optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat):
        assert master.data_ptr() == partition.data_ptr()  # the master weights are the parameters' partition


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_holds_no_more_than_fsdp(spawn):
    spawn(run_zero3_step, WORLD_SIZE)
