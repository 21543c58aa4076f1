"""Generate text from a model, nanoGPT style: a train.py run directory (its newest ckpt-*), one of its ckpt-<step>
directories, or a Hugging Face Llama directory.

    python train.py && python sample.py --ckpt out/tr-dpo-soft --prompt "abc=" --temperature 0
    python sample.py --ckpt /path/to/Llama-3.2-1B --tokenizer /path/to/tokenizer.model --prompt "Once upon a time"
    python sample.py --ckpt out/my-dpo-run --chat "What is the capital of France?"

The tokenizer is --tokenizer, or else the model directory's own (its tokenizer.json or llama2.c tok*.bin, which a
checkpoint of a run with a tokenizer.json carries), or else the one the run was trained with (its train_config.json).
--chat renders a user message with the tokenizer's chat template (or the plain "Human: / Assistant:" format when it
has none), stops at the end of the assistant's turn and prints the reply alone.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

import checkpoint
from tokenizer import find_tokenizer, get_tokenizer
from model import Llama, check_context


class SampleError(ValueError):
    """A bad path or option: main() prints it as one line and exits with status 2."""


def run_tokenizer(ckpt: Path, model_dir: Path) -> str:
    """The model directory's own tokenizer, else the one recorded in the train_config.json of a checkpoint (or of the
    run directory given)."""
    if (own := find_tokenizer(model_dir)) is not None:
        return str(own)
    for cfg in (model_dir / "train_config.json", ckpt / "train_config.json"):
        if cfg.is_file():
            try:
                name = json.loads(cfg.read_text()).get("tokenizer")
            except (ValueError, AttributeError) as e:  # not JSON, or not an object
                raise SampleError(f"{cfg}: not a JSON object ({type(e).__name__}: {e})") from None
            if not isinstance(name, str):
                raise SampleError(f"{cfg}: 'tokenizer' is {name!r}, not a tokenizer's name or path: pass --tokenizer")
            return name
    raise SampleError(f"--ckpt {ckpt}: no tokenizer.json, llama2.c tok*.bin or train_config.json naming its "
                      f"tokenizer: pass --tokenizer")


def check_options(args: argparse.Namespace):
    """Refuse a bad option before anything is read: the sampling parameters, counts, the seed and the device."""
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise SampleError(f"--temperature {args.temperature}: need a finite number >= 0 (0 = greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise SampleError(f"--top_k {args.top_k}: need >= 1 (the number of likeliest tokens kept)")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # NaN fails too
        raise SampleError(f"--top_p {args.top_p}: need 0 < top_p <= 1 (the probability mass kept)")
    for name in ("max_new_tokens", "num_samples"):
        if (value := getattr(args, name)) is not None and value < 1:
            raise SampleError(f"--{name} {value}: need >= 1")
    if not 0 <= args.seed < 2 ** 64:
        raise SampleError(f"--seed {args.seed}: need 0 <= seed < 2**64")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SampleError(f"--device {args.device}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {args.device}: torch sees no GPU (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SampleError(f"--device {args.device}: torch sees {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise SampleError(f"--device {args.device}: only cpu and cuda are supported")


def sample(args: argparse.Namespace):
    check_options(args)
    ckpt = Path(args.ckpt)
    if not ckpt.exists():
        raise SampleError(f"--ckpt {ckpt}: no such file or directory")
    try:
        model_dir = checkpoint.model_dir(ckpt)
        model = Llama.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    except (ValueError, OSError, SafetensorError) as e:
        raise SampleError(f"--ckpt {ckpt}: {e}") from None
    if model.is_reward_model:
        raise SampleError(f"--ckpt {ckpt}: a reward model (a score head, no LM head) does not generate; judge.py "
                          "scores text with it")
    name = args.tokenizer or run_tokenizer(ckpt, model_dir)
    try:
        tok = get_tokenizer(name)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: tiktoken offline without its files
        raise SampleError(f"tokenizer {name}: {e}") from None
    if args.chat is not None:  # the chat template's prompt: BOS and the markup are the template's
        try:
            ids = tok.ids(tok.render([{"role": "user", "content": args.chat}])[0])[0]
        except ValueError as e:  # the template refused the chat (raise_exception), or cannot render it
            raise SampleError(f"--chat: {e}") from None
    else:
        ids = tok.encode(args.prompt)
        if tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids = [tok.bos_id] + ids
    if not ids:
        raise SampleError("--prompt is empty and the tokenizer has no BOS token to start from")
    if max(ids) >= model.config.vocab_size:
        raise SampleError(f"tokenizer {name} produced id {max(ids)}, outside the model's vocab_size "
                          f"{model.config.vocab_size} ({model_dir}/config.json)")
    context, prompt = model.config.max_seq_len, "--chat" if args.chat is not None else "--prompt"
    if len(ids) >= context:
        raise SampleError(f"{prompt} is {len(ids)} tokens, which leaves no room in the model's context of {context} "
                          f"(max_position_embeddings, {model_dir}/config.json)")
    new_tokens = args.max_new_tokens or min(200, context - len(ids))  # default: 200, or what the context leaves
    if len(ids) + new_tokens > context:
        raise SampleError(f"--max_new_tokens {new_tokens}: {prompt} ({len(ids)} tokens) + {new_tokens} = "
                          f"{len(ids) + new_tokens} tokens exceed the model's context of {context} "
                          f"(max_position_embeddings, {model_dir}/config.json): use at most {context - len(ids)}")
    try:
        check_context(model.config, len(ids) + new_tokens)
    except ValueError as e:
        raise SampleError(f"--ckpt {ckpt}: {e} (prompt + --max_new_tokens)") from None
    torch.manual_seed(args.seed)
    stop = tok.end_ids  # EOS, the end of a turn
    for _ in range(args.num_samples):
        new = model.generate([ids], new_tokens, args.temperature, args.top_k, args.top_p, stop_ids=stop)[0]
        text = tok.decode([t for t in new if t not in stop])
        print(text if args.chat is not None else args.prompt + text)
        print("---------------")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: p.exit(2, f"sample.py: error: {message}\n")  # one line, without the usage block
    p.add_argument("--ckpt", required=True, help="run directory, ckpt-<step> directory or Hugging Face model directory")
    p.add_argument("--tokenizer", help="a name or path get_tokenizer knows (byte, gpt2, tokenizer.json, "
                                       "tokenizer.model); default: the model directory's own, else the run's "
                                       "(train_config.json)")
    p.add_argument("--prompt", default="", help="text to continue (BOS is put in front when the tokenizer has one)")
    p.add_argument("--chat", help="a user message: the reply to it through the chat template (not with --prompt)")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: 200, or as many as the model's context leaves after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    if args.chat is not None and args.prompt:
        p.error("--chat and --prompt exclude each other (--chat's prompt is the chat template's)")
    try:
        sample(args)
    except SampleError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
