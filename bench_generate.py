"""Peak memory of Llama.generate by total length (prompt + new tokens): each length runs in a fresh process, since a
process's peak RSS (resource.getrusage's ru_maxrss) only ever grows. A tiny random model (so the model's own memory
is negligible and what grows is generate's), rows of different prompt lengths (left padding), greedy, the KV cache,
no early stop. Prints a Markdown table and, with --json, one JSON object a line.

    python bench_generate.py --lengths 1024,4096,16384
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from model import Llama, ModelConfig


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(length: int, batch: int, prompt_len: int) -> dict:
    """generate() to `length` tokens in this process: the peak RSS before it (torch, the model, a short warm-up
    generation) and after it. One thread: on a shared CPU, more only wait for each other at this size."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Llama(ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, max_seq_len=length)).eval()
    prompts = [[1 + (b + i) % 500 for i in range(prompt_len - b)] for b in range(batch)]  # row b: b pads
    model.generate(prompts, 8, stop_ids=())
    before, t = peak_rss_mb(), time.time()
    rows = model.generate(prompts, length - prompt_len, stop_ids=())
    assert all(len(r) == length - prompt_len for r in rows)
    return {"tokens": length, "batch": batch, "prompt_len": prompt_len, "peak_rss_mb": round(peak_rss_mb()),
            "generate_mb": round(peak_rss_mb() - before), "seconds": round(time.time() - t, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="1024,4096,16384", help="comma-separated totals, prompt + new tokens")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt_len", type=int, default=16, help="the longest row's prompt; row b has b tokens fewer")
    p.add_argument("--json", action="store_true", help="one JSON object a line, after the table")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one length, its JSON on stdout
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.prompt_len)))
        return 0
    results = []
    for length in map(int, args.lengths.split(",")):
        child = subprocess.run([sys.executable, __file__, "--one", str(length), "--batch",
                                str(args.batch), "--prompt_len", str(args.prompt_len)],
                               capture_output=True, text=True, check=True)
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print("| tokens (prompt + new) | batch | peak RSS (MB) | generate's growth (MB) | seconds |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tokens']:,} | {r['batch']} | {r['peak_rss_mb']:,} | {r['generate_mb']:,} | {r['seconds']} |")
    if args.json:
        for r in results:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
