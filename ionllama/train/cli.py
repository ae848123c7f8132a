"""`python train_cloud.py ...` / `ionllama train ...` and `ionllama prepare ...`.

The original plan's flags work verbatim (--size, --dataset, --data_dir, --seq_len, --batch_size,
--grad_accum, --lr, --max_steps, --warmup_steps, --mixed_precision, --wandb, --run_name, --save_dir,
--eval_interval, --benchmark_after); the rest are additions."""
from __future__ import annotations

import argparse
import sys

from ..config import parse_ngram_sizes
from ..errors import OneLineParser, UserError, cli_entry, is_out_of_memory
from .schedule import DEFAULT_MIN_LR_RATIO

SIZES = ("tiny", "small", "base", "large", "xl")
DATASETS = ("tinystories", "fineweb", "openwebtext", "builtin", "tasks")

def ngram_sizes_arg(text: str) -> tuple[int, ...]:
    """--ngram_sizes: parse_ngram_sizes' own message in the error (argparse said "invalid parse_ngram_sizes value")."""
    try:
        return parse_ngram_sizes(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# model options passed into create_model when given (None = the size's default)
MODEL_OVERRIDES = {
    "attention": str, "local_layers": str, "patching": str, "threshold_mode": str, "max_patch_size": int,
    "target_patch_size": float, "ngram": str, "pooling": str, "d_model": int, "n_layers": int, "n_heads": int,
    "d_local": int, "n_enc_layers": int, "n_dec_layers": int, "vocab_size": int, "latent_shift": str,
    "dropout": float, "local_dropout": float, "fixed_patch_size": int, "entropy_chunk": int, "ngram_buckets": int,
    "ngram_sizes": ngram_sizes_arg, "embed_std": float, "dec_init": str, "local_width": int,
    "local_init": str,
    # the entropy model's sizes: a reused one (--entropy_checkpoint) of another --size needs them
    "d_entropy": int, "n_entropy_layers": int, "entropy_state": int, "entropy_headdim": int,
}


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="builtin",
                   help="hub dataset (needs internet), builtin (the Python stdlib, offline) or tasks")
    g.add_argument("--data_path", default=None,
                   help="local data instead of --dataset: text file, directory, glob, .jsonl(.gz/.xz), .parquet; "
                        "'{split}' in the path names given split files (e.g. books-{split}.jsonl.xz)")
    g.add_argument("--data_dir", default="data_cache", help="where prepared byte shards are cached")
    g.add_argument("--text_field", default="text", help="field holding the text in jsonl / parquet / hub rows")
    g.add_argument("--val_fraction", type=float, default=0.01,
                   help="share of documents held out for val, in (0, 0.5); unused with given splits (default 0.01)")
    g.add_argument("--split_seed", type=int, default=0, help="seed of the document hash split")
    g.add_argument("--max_bytes", type=int, default=None,
                   help="cap on source bytes taken, train and val together (given split files: train; "
                   "their val up to max(1 MB, val_fraction x cap)); the document crossing it is cut")
    g.add_argument("--builtin_bytes", type=int, default=8_000_000, help="size cap of --dataset builtin")
    g.add_argument("--fineweb_bytes", type=int, default=2_000_000_000, help="bytes streamed for --dataset fineweb")


def build_train_parser(prog: str = "ionllama train") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Train an ionLlama (or baseline) byte-level LM.")
    add_data_args(p)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="ionllama", help="registered model name (ionllama, dense, ...)")
    g.add_argument("--size", choices=SIZES, default="tiny")
    for name, typ in MODEL_OVERRIDES.items():
        g.add_argument(f"--{name}", type=typ, default=None, help="override the size's default")
    g = p.add_argument_group("training")
    g.add_argument("--seq_len", type=int, default=1024, help="bytes per training window")
    g.add_argument("--batch_size", type=int, default=16, help="windows per micro-batch (per process)")
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default by size)")
    g.add_argument("--weight_decay", type=float, default=0.1)
    g.add_argument("--grad_clip", type=float, default=1.0)
    g.add_argument("--max_steps", type=int, default=5000, help="optimizer steps of the main model (main + joint phases); with entropy patching the entropy phase's --entropy_steps come on top")
    g.add_argument("--warmup_steps", type=int, default=None,
                   help="default: max_steps / 10, at most 1000; each phase warms up again, over at most "
                        "entropy_steps / 10 (phase 1) or half its steps (phase 2); the joint phase has none")
    g.add_argument("--min_lr_ratio", type=float, default=DEFAULT_MIN_LR_RATIO,
                   help="the cosine ends at lr x this (0: decays to zero); the entropy phase uses it too")
    g.add_argument("--entropy_steps", type=int, default=None,
                   help="phase 1 steps (default max_steps // 3; 0 with --entropy_checkpoint)")
    g.add_argument("--entropy_checkpoint", default=None, metavar="PATH",
                   help="take the entropy model's weights from this checkpoint (.pt, .safetensors or .dcp of an "
                        "entropy-patching ionllama model, e.g. a phase-1 run on other data) instead of training "
                        "one: phase 1 is skipped unless --entropy_steps is given, and the threshold is calibrated on "
                        "this run's val split for this run's --target_patch_size / --threshold_mode "
                        "(default: none)")
    g.add_argument("--joint_steps", type=int, default=None, help="phase 3 steps (default max_steps // 10)")
    g.add_argument("--entropy_lr", type=float, default=2e-3)
    g.add_argument("--task_mix", type=float, default=0.0, help="fraction of each batch replaced by task examples")
    g.add_argument("--mixed_precision", choices=("bf16", "fp16", "none"), default=None,
                   help="default: bf16 on GPUs that support it, else none")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile_mode", choices=("default", "reduce-overhead"), default="default",
                   help="with --compile: reduce-overhead also replays the compiled model as CUDA graphs (single "
                        "process; models without a host sync in the forward: dense, bpe, mamba)")
    g.add_argument("--step_graph", action="store_true",
                   help="capture the whole training step (forward, backward, clipping, AdamW) once as a CUDA graph "
                        "and replay it: no per-kernel launch cost. One GPU, --grad_accum 1, bf16 or fp32; combines "
                        "with --compile (default mode). Entropy and space patching: patch boundaries first, "
                        "uncaptured, then one graph per bucket of the batch's patch count; the joint phase runs "
                        "uncaptured")
    g.add_argument("--compile_stage_a", choices=("auto", "on", "off"), default="auto",
                   help="with --step_graph and entropy patching: torch.compile stage A (the frozen entropy model and "
                        "the patcher) before it is captured; auto = with --compile (6-7%% faster steps on an H200, "
                        "docs/results/train-profile.md)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    g.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default="auto",
                   help="under torchrun: ddp (replicated) or fsdp (FSDP2, sharded per block); auto = ddp for "
                        "tiny / small, fsdp for base and larger (see docs/multigpu.md)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop_at", type=int, default=None,
                   help="pause: stop after this global step, saving latest.pt (latest.dcp under torchrun); resume "
                        "with --resume")
    g.add_argument("--max_train_time", type=float, default=None,
                   help="stop once the run has trained this many seconds in all (a resume counts earlier sessions)")
    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval_interval", type=int, default=None, help="default: total steps / 4, at most 500")
    g.add_argument("--eval_bytes", type=int, default=None, help="cap on val bytes scored per evaluation (default all)")
    g.add_argument("--eval_batch_size", type=int, default=None, help="default: --batch_size")
    g.add_argument("--log_interval", type=int, default=10)
    g.add_argument("--save_dir", default="checkpoints")
    g.add_argument("--run_name", default=None,
                   help="default: <model>-<size>-<data>, <data> the --dataset name or the --data_path file's stem "
                        "(e.g. ionllama-tiny-builtin); a folder that holds checkpoints already gets -2, -3, ...")
    g.add_argument("--save_interval", type=int, default=None,
                   help="step_N.pt (step_N.dcp under torchrun) every N steps (default: total / 2)")
    g.add_argument("--resume", default=None,
                   help="checkpoint path (a .pt, a .dcp folder, or a run folder: its latest), or 'auto' = latest.pt "
                        "(latest.dcp from torchrun; the newer if both) of --save_dir/--run_name")
    g.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--sample_bytes", type=int, default=256, help="bytes generated after training (0: none)")
    g.add_argument("--sample_prompt", default=None, help="prompt of that sample (default: start of a val document)")
    g.add_argument("--benchmark_after", action="store_true", help="run the benchmark suite on best.pt afterwards")
    return p


def explicit_args(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Names of the flags the user actually gave (so a resumed run keeps the checkpoint's others)."""
    quiet = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # (as the real parser: no prefixes)
    for a in parser._actions:
        if a.option_strings and a.dest != "help":
            kw = {"dest": a.dest, "default": argparse.SUPPRESS}
            if a.nargs == 0:
                kw["action"] = "store_const"
                kw["const"] = True
            quiet.add_argument(*a.option_strings, **kw)
    ns, _ = quiet.parse_known_args(argv)
    return set(vars(ns))


@cli_entry
def main(argv: list[str] | None = None, prog: str = "ionllama train") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_train_parser(prog)  # usage and errors name the command that was typed
    args = parser.parse_args(argv)
    from .trainer import train

    try:
        train(args, explicit=explicit_args(parser, argv))
    except (MemoryError, RuntimeError, TypeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        # --batch_size 100000000 was a numpy / torch allocation traceback; checkpoints already saved stay as they are
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory at --batch_size {args.batch_size} x --seq_len {args.seq_len}; pass a smaller "
                        "--batch_size (--grad_accum keeps the batch) or --seq_len") from None
    return 0


def build_prepare_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ionllama prepare", description="Build the byte shards of a dataset without training.")
    add_data_args(p)
    p.add_argument("--verify", action="store_true", help="recompute the shard checksums")
    return p


def data_args_from(args: argparse.Namespace):
    from ..data.shards import DataArgs

    return DataArgs(dataset=args.dataset, data_path=args.data_path, data_dir=args.data_dir, text_field=args.text_field,
                    val_fraction=args.val_fraction, split_seed=args.split_seed, max_bytes=args.max_bytes,
                    builtin_bytes=args.builtin_bytes, fineweb_bytes=args.fineweb_bytes)


@cli_entry
def prepare_main(argv: list[str] | None = None) -> int:
    args = build_prepare_parser().parse_args(argv)
    from ..data.shards import open_shards, prepare, verify_shards

    if args.dataset == "tasks" and not args.data_path:
        raise UserError("--dataset tasks is generated on the fly; there is nothing to prepare")
    path = prepare(data_args_from(args))
    shards = open_shards(path)
    if args.verify:
        verify_shards(shards)
        print("checksums ok")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
