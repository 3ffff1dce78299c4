"""What autograd keeps for the backward, per token: each block type and each 370M preset, with and without
activation checkpointing; and how attention models' memory grows with the sequence length.

- blocks: one block (pre-norm mixer + SwiGLU MLP) of each type at its 370M preset's widths, under bf16
  autocast. Bytes per token are the slope between two lengths, so what does not grow with the tokens
  (autocast's bf16 copies of the weights, chunk tables) drops out; split by component, each storage
  charged to the innermost module that saved it (model/memory.py). Checkpointed, a block keeps its input.
- presets: each 370M preset: its blocks' figures along its layer pattern plus the rest of the model
  (embedding, final norm, head and fused loss: model/loss.py), measured the same way, for
  parallel.activation_checkpointing none, selective (every 2nd block) and full; GiB at 16 x 2048 tokens.
- sp (under torchrun, gloo): each block of `blocks` under sequence parallelism, the group the torchrun ranks
  (2: `--nproc_per_node=2`), one row whose one document starts on rank 0, each rank holding its slice of
  T tokens; bytes per local token on each rank, against the same block in one process (what `blocks` gives)
  and against the attention block, in one process and under sp (whose ranks keep the keys and values they
  gathered from the ranks before them).
- growth (what bench/attention_memory.py was): patterns A, W and GA on a small model, total bytes at
  T = 2048 and 8192; linear memory means x4 tokens -> x4 bytes.

The recurrent ops run the Triton kernels' autograd Functions, what a GPU runs, in Triton's interpreter
(BATON_KERNELS=triton TRITON_INTERPRET=1, set here unless --kernels torch, the chunked PyTorch path, which
keeps far more). Attention runs its CPU path, which keeps q, k and v (FlexAttention on a GPU also keeps
its output and log-sum-exp). The interpreter is slow, so the default lengths are short; bytes per token
do not depend on the length (every op keeps O(T)): `--lengths 1024 2048` gives the same figures.
Prints tables and writes JSON (versions, date, config, results) to bench/results/.

    python -m bench.activation_memory                          # blocks and presets at T 128 -> 256, growth
    python -m bench.activation_memory --lengths 1024 2048 --parts blocks
    python -m bench.activation_memory --parts growth --growth-lengths 512 2048 --documents 3
    torchrun --nproc_per_node=2 -m bench.activation_memory --parts sp
"""
import argparse
import os
import warnings

import torch
import torch.distributed as dist

from bench.common import REPO, write_results


def use_kernels(kernels: str) -> None:
    """Before anything imports Triton: the interpreter decides at decoration time whether it runs a kernel."""
    if kernels == "triton":
        os.environ.setdefault("BATON_KERNELS", "triton")
        os.environ.setdefault("TRITON_INTERPRET", "1")
        warnings.filterwarnings("ignore", category=RuntimeWarning)  # the interpreter's bf16 overflows: values unused


CONFIGS = REPO / "configs" / "model"
PRESETS = ["transformer_370m", "gla_370m", "gla_hybrid_370m", "mamba2_370m", "mamba2_hybrid_370m",
           "gated_deltanet_370m", "gated_deltanet_hybrid_370m", "mlstm_370m"]
BLOCK_TYPES = {"attention": "transformer_370m", "gla": "gla_370m", "mamba2": "mamba2_370m",
               "gated_deltanet": "gated_deltanet_370m", "mlstm": "mlstm_370m", "rglru": "hawk_370m"}
VOCAB = 32000  # what the presets' parameter counts assume
STEP_TOKENS = 16 * 2048  # the GPU step: 16 rows of 2048
KiB, GiB = 1024, 2 ** 30


def preset_config(name: str):
    from omegaconf import OmegaConf

    from model import ModelConfig

    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    cfg.vocab_size = VOCAB
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), cfg))


def per_token(measure, lengths: list[int]) -> dict[str, float]:
    """Bytes per token by component: the slope of measure(T) (a dict of bytes) between the two lengths."""
    short, long = (measure(seq_len) for seq_len in lengths)
    return {name: (long.get(name, 0) - short.get(name, 0)) / (lengths[1] - lengths[0])
            for name in sorted(set(short) | set(long))}


def block_bytes(cfg, mixer: str, lengths: list[int], checkpointed: bool, sp_group=None) -> dict[str, float]:
    """One block's bytes per token by component; with sp_group, on this rank of that sequence-parallel group
    (one row, its one document starting on rank 0, T local tokens per rank)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from model.lm import Block
    from model.memory import saved_bytes_by_module
    from parallel.sequence import SequenceParallel

    torch.manual_seed(0)
    block = Block(cfg, mixer)
    if checkpointed:
        block = checkpoint_wrapper(block, preserve_rng_state=False)

    def measure(seq_len: int) -> dict[str, int]:
        x = torch.randn(1, seq_len, cfg.d_model, requires_grad=True)  # the fp32 residual stream
        context = {}
        if sp_group is not None:
            sp = SequenceParallel(sp_group, torch.tensor([0, seq_len], dtype=torch.int32),
                                  torch.tensor([dist.get_rank(sp_group) == 0]))
            context = dict(cu_seqlens=sp.cu_seqlens, sp=sp)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_bytes_by_module(block, x, **context)
    return per_token(measure, lengths)


def rest_bytes(cfg, lengths: list[int]) -> float:
    """Embedding, final norm, head and loss per token: a one-layer model's figures outside its block."""
    from dataclasses import replace

    from model import LM
    from model.memory import saved_bytes_by_module

    torch.manual_seed(0)
    lm = LM(replace(cfg, pattern="A", n_layers=None))

    def measure(seq_len: int) -> dict[str, int]:
        ids = torch.randint(0, VOCAB, (1, seq_len + 1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_bytes_by_module(lm, ids[:, :-1], labels=ids[:, 1:])
    return sum(value for name, value in per_token(measure, lengths).items() if not name.startswith("blocks"))


def block_key(cfg, mixer: str) -> str:
    """Blocks of equal widths and mixer settings keep the same bytes: measured once."""
    settings = getattr(cfg, "attention" if mixer == "sliding_window" else mixer)
    return f"{mixer} d{cfg.d_model} ff{cfg.mlp_hidden} {settings}"


def run_blocks_and_presets(lengths: list[int], parts: list[str]) -> dict:
    from parallel.activation_checkpointing import checkpointed_blocks

    cache: dict[str, dict] = {}

    def block(cfg, mixer: str) -> dict:
        key = block_key(cfg, mixer)
        if key not in cache:
            cache[key] = {"none": block_bytes(cfg, mixer, lengths, False),
                          "checkpointed": sum(block_bytes(cfg, mixer, lengths, True).values())}
            cache[key]["total"] = sum(cache[key]["none"].values())
            print(f"  measured {mixer} block ({key}): {cache[key]['total'] / KiB:.1f} KiB/token", flush=True)
        return cache[key]

    out = {"blocks": [], "presets": []}
    if "blocks" in parts:
        attention = block(preset_config(BLOCK_TYPES["attention"]), "attention")["total"]
        print(f"\nblocks (370M widths, bf16 autocast, bytes per token from T={lengths[0]} -> {lengths[1]}):")
        print(f"{'block':>15} {'KiB/token':>10} {'x attention':>12} {'checkpointed':>13}   largest components (KiB)")
        for mixer, preset in BLOCK_TYPES.items():
            figures = block(preset_config(preset), mixer)
            top = sorted(figures["none"].items(), key=lambda item: -item[1])[:6]
            print(f"{mixer:>15} {figures['total'] / KiB:10.1f} {figures['total'] / attention:12.2f} "
                  f"{figures['checkpointed'] / KiB:13.1f}   "
                  + ", ".join(f"{name or 'block'} {value / KiB:.1f}" for name, value in top))
            out["blocks"].append(dict(block=mixer, preset=preset, bytes_per_token=figures["total"],
                                      checkpointed_bytes_per_token=figures["checkpointed"],
                                      ratio_to_attention=figures["total"] / attention,
                                      components=figures["none"]))
    if "presets" in parts:
        print(f"\n370M presets (KiB per token; GiB at {STEP_TOKENS:,} tokens), activation checkpointing:")
        print(f"{'preset':>28} {'layers':>6} {'none':>16} {'selective':>16} {'full':>16} {'x transformer':>14}")
        rests: dict[int, float] = {}
        transformer = None
        for name in PRESETS:
            cfg = preset_config(name)
            if cfg.d_model not in rests:
                rests[cfg.d_model] = rest_bytes(cfg, lengths)
            mixers = cfg.layer_mixers()
            row = dict(preset=name, layers=len(mixers), rest_bytes_per_token=rests[cfg.d_model])
            for mode in ("none", "selective", "full"):
                recomputed = set(checkpointed_blocks(len(mixers), mode, 2))
                row[mode] = rests[cfg.d_model] + sum(
                    block(cfg, m)["checkpointed" if i in recomputed else "total"] for i, m in enumerate(mixers))
            transformer = transformer or row["none"]
            cells = "".join(f" {row[m] / KiB:7.0f} ({row[m] * STEP_TOKENS / GiB:5.1f})" for m in
                            ("none", "selective", "full"))
            print(f"{name:>28} {len(mixers):6d}{cells} {row['none'] / transformer:14.2f}")
            out["presets"].append(row)
    return out


def run_sp(lengths: list[int]) -> list[dict]:
    """Every rank of the torchrun group measures its slice; rank 0 also the blocks in one process, and prints."""
    group, rank, size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    rows = []
    for mixer, preset in BLOCK_TYPES.items():
        cfg = preset_config(preset)
        per_rank = [None] * size
        dist.all_gather_object(per_rank, sum(block_bytes(cfg, mixer, lengths, False, group).values()))
        plain = sum(block_bytes(cfg, mixer, lengths, False).values()) if rank == 0 else None
        rows.append(dict(block=mixer, preset=preset, plain_bytes_per_token=plain, sp_bytes_per_token=per_rank))
        if rank == 0:
            print(f"  measured {mixer}: {plain / KiB:.1f} KiB/token in one process, "
                  + ", ".join(f"rank {r} {b / KiB:.1f}" for r, b in enumerate(per_rank)) + f" under sp = {size}",
                  flush=True)
    if rank != 0:
        return rows
    attention = rows[0]
    print(f"\nblocks under sequence parallelism (sp = {size}, 370M widths, bf16 autocast, bytes per local token "
          f"from T={lengths[0]} -> {lengths[1]} per rank; 'x attention': the most any rank keeps over the attention "
          "block in one process / under sp):")
    print(f"{'block':>15} {'one process':>12} " + " ".join(f"{f'rank {r}':>8}" for r in range(size))
          + f" {'x sp/plain':>11} {'x attention':>12} {'x sp attention':>15}")
    for row in rows:
        most = max(row["sp_bytes_per_token"])
        row.update(sp_over_plain=most / row["plain_bytes_per_token"],
                   ratio_to_attention=most / attention["plain_bytes_per_token"],
                   ratio_to_sp_attention=most / max(attention["sp_bytes_per_token"]))
        print(f"{row['block']:>15} {row['plain_bytes_per_token'] / KiB:12.1f} "
              + " ".join(f"{b / KiB:8.1f}" for b in row["sp_bytes_per_token"])
              + f" {row['sp_over_plain']:11.2f} {row['ratio_to_attention']:12.2f} {row['ratio_to_sp_attention']:15.2f}")
    return rows


def run_growth(lengths: list[int], patterns: list[str], layers: int, d_model: int, window: int,
               documents: int) -> list[dict]:
    from model import LM, ModelConfig
    from model.config import AttentionConfig, GLAConfig
    from model.memory import packed_documents, saved_bytes

    print(f"\ngrowth with T (d_model {d_model}, {layers} layers, vocabulary 256, fp32):")
    results = []
    for pattern in patterns:
        torch.manual_seed(0)
        lm = LM(ModelConfig(vocab_size=256, d_model=d_model, d_ff=2 * d_model, pattern=pattern, n_layers=layers,
                            attention=AttentionConfig(num_heads=4, num_kv_heads=2, window=window),
                            gla=GLAConfig(num_heads=4)))
        sizes = []
        for seq_len in lengths:
            ids = torch.randint(0, lm.config.vocab_size, (1, seq_len))
            sizes.append(saved_bytes(lm, ids, packed_documents(seq_len, documents)))
            results.append(dict(pattern=pattern, seq_len=seq_len, saved_bytes=sizes[-1]))
            print(f"{pattern:>3} T={seq_len:>6}: {sizes[-1] / 2**20:9.1f} MiB saved for backward", flush=True)
        print(f"{pattern:>3} x{lengths[-1] / lengths[0]:g} tokens -> x{sizes[-1] / sizes[0]:.2f} bytes")
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["blocks", "presets", "growth"],
                        choices=["blocks", "presets", "growth", "sp"], help="sp: under torchrun, alone")
    parser.add_argument("--lengths", type=int, nargs=2, default=[128, 256], help="blocks and presets: two lengths")
    parser.add_argument("--kernels", choices=["triton", "torch"], default="triton",
                        help="triton: the GPU kernels' autograd in the interpreter; torch: the CPU chunked path")
    parser.add_argument("--growth-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--patterns", nargs="+", default=["A", "W", "GA"])
    parser.add_argument("--layers", type=int, default=2, help="growth: n_layers (a multiple of the pattern's length)")
    parser.add_argument("--d-model", type=int, default=128, help="growth: model width")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--documents", type=int, default=1, help="growth: equal documents packed in the row")
    parser.add_argument("--tag", default="", help="added to the JSON's name (e.g. before / after)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    use_kernels(args.kernels)
    if args.threads:
        torch.set_num_threads(args.threads)

    if "sp" in args.parts:
        if args.parts != ["sp"] or "RANK" not in os.environ:
            parser.error("--parts sp runs alone, under torchrun (torchrun --nproc_per_node=2 -m bench.activation_memory"
                         " --parts sp)")
        dist.init_process_group("gloo")
        try:
            rows = run_sp(args.lengths)
        finally:
            dist.destroy_process_group()
        if int(os.environ["RANK"]) == 0:
            write_results("activation_memory_sp" + (f"_{args.tag}" if args.tag else ""),
                          dict(config=vars(args), ranks=len(rows[0]["sp_bytes_per_token"]), sp=rows))
        return
    report = run_blocks_and_presets(args.lengths, args.parts)
    if "growth" in args.parts:
        report["growth"] = run_growth(args.growth_lengths, args.patterns, args.layers, args.d_model, args.window,
                                      args.documents)
    write_results("activation_memory" + (f"_{args.tag}" if args.tag else ""), dict(config=vars(args), **report))


if __name__ == "__main__":
    main()
