"""Generate text from a checkpoint directory (ours or a Hugging Face Llama), nanoGPT style.

python sample.py --ckpt out/final --tokenizer gpt2 --prompt "Once upon a time" --temperature 0.8 --top_k 200
"""
import argparse

import torch

from data import get_tokenizer
from model import Llama


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="directory with config.json and safetensors weights")
    p.add_argument("--tokenizer", required=True, help="a name or path get_tokenizer knows: gpt2, byte, ...")
    p.add_argument("--prompt", default="", help="text to continue (BOS is put in front when the tokenizer has one)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    model = Llama.from_pretrained(args.ckpt, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    tok = get_tokenizer(args.tokenizer)
    ids = tok.encode(args.prompt)
    if tok.bos_id is not None and ids[:1] != [tok.bos_id]:
        ids = [tok.bos_id] + ids
    if not ids:
        p.error("--prompt is empty and the tokenizer has no BOS token to start from")
    if max(ids) >= model.config.vocab_size:
        p.error(f"--tokenizer {args.tokenizer} produced id {max(ids)}, outside the model's vocab_size "
                f"{model.config.vocab_size} ({args.ckpt}/config.json)")
    stop = [] if tok.eos_id is None else [tok.eos_id]
    for _ in range(args.num_samples):
        new = model.generate([ids], args.max_new_tokens, args.temperature, args.top_k, args.top_p, stop_ids=stop)[0]
        print(args.prompt + tok.decode([t for t in new if t not in stop]))
        print("---------------")


if __name__ == "__main__":
    main()
