"""A GPT-2-small-shaped causal LM (12 layers x 768, 12 heads), randomly initialised, saved
with a finished run's tokenizer as a Hugging Face folder that `model.source=checkpoint`
reads: a model whose own cost per token is realistic, for the token memory's throughput
(benchmarks/lm_throughput.py) where no pretrained model of that size can be fetched.

    python benchmarks/random_causal_lm.py --tokenizer runs/bbc_lm/seed0/tokenizer --out models/gpt2_small_random
    resmem run --config jobs/configs/given_causal_lm.yaml model.path=models/gpt2_small_random \\
        run_dir=runs/gpt2_small_random
    python benchmarks/lm_throughput.py --config jobs/configs/given_causal_lm.yaml \\
        model.path=models/gpt2_small_random run_dir=runs/gpt2_small_random --variant "GPT-2-small shape"
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (a bbc_lm run's RUN/tokenizer)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.positions, n_embd=args.dim, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), out)  # whole or not at all
    print(f"{out}: GPT-2 {args.layers} x {args.dim}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
          f"parameters, vocabulary {len(tokenizer)}")


if __name__ == "__main__":
    main()
