"""Your own model, end to end: tiny random Qwen2- and SmolLM2-shaped models written by transformers beside the real
tokenizer files (../shared/models), a Hub-style parquet preference dataset in TRL's conversational format, then
train.py (TR-DPO soft), --resume, sample.py --chat, DDP on 2 processes, and the checkpoint reloaded by transformers.
This is the README's "your own model" command at toy size."""
import json
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
from conftest import ROOT, shared_path
from model import Llama
from test_train import ENV, metrics, run

pytest.importorskip("pyarrow", reason="parquet datasets need pyarrow")
pytest.importorskip("jinja2", reason="chat templates need jinja2")
transformers = pytest.importorskip("transformers", reason="transformers writes the tiny models")

FAMILIES = {  # shared model directory with the real tokenizer files, and the transformers config of a tiny model
    "qwen2": ("qwen2.5-0.5b-instruct", "Qwen2Config", dict(vocab_size=151936, tie_word_embeddings=True)),
    "smollm2": ("smollm2-135m-instruct", "LlamaConfig", dict(vocab_size=49152, tie_word_embeddings=True)),
}
CHATS = [  # (user turns and assistant replies before the last question, question, chosen, rejected)
    ("What is the capital of France?", "The capital of France is Paris.", "It is Berlin."),
    ("Write a haiku about rain.", "Soft rain on the roof,\nthe garden drinks and listens,\nnight hums in silver.",
     "Rain."),
    ("How do I reverse a list in Python?", "Use `xs[::-1]` or `xs.reverse()` in place.", "You can't."),
    ("Say <|im_end|> literally.", "Here it is: <|im_end|>", "No."),  # markup typed by a user stays text
]


def write_dataset(root):
    """A Hub snapshot of an implicit-prompt conversational preference set (trl-lib/ultrafeedback_binarized's layout:
    data/train-*.parquet, data/test-*.parquet; chosen and rejected are whole conversations; extra score columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 8), ("test", 4)):
        rows = {"chosen": [], "rejected": [], "score_chosen": [], "score_rejected": []}
        for i in range(n):
            q, good, bad = CHATS[i % len(CHATS)]
            system = [{"role": "system", "content": "You are a helpful assistant."}] if i % 2 else []
            prompt = system + [{"role": "user", "content": f"{q} ({split} {i})"}]
            rows["chosen"].append(prompt + [{"role": "assistant", "content": good}])
            rows["rejected"].append(prompt + [{"role": "assistant", "content": bad}])
            rows["score_chosen"].append(8.0)
            rows["score_rejected"].append(2.0)
        pq.write_table(pa.table(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def write_model(family: str, path):
    """A tiny random model of the family, saved by transformers, with the real tokenizer files beside it."""
    shared, config_class, extra = FAMILIES[family]
    source = shared_path("models", shared)
    cfg = getattr(transformers, config_class)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                              **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, path / name)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ultrafeedback"))


COMMON = ["--loss=dpo", "--ref_update=soft", "--tau=2", "--alpha=0.5", "--batch_size=4", "--micro_batch_size=2",
          "--max_length=96", "--max_prompt_length=64", "--eval_size=4", "--num_samples=2", "--max_new_tokens=8",
          "--lr=1e-3", "--warmup_steps=0", "--schedule=constant", "--ckpt_every=2", "--eval_every=2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_train_resume_chat_and_reload_in_transformers(tmp_path, dataset, family, capsys):
    import sample
    model_dir = write_model(family, tmp_path / family)
    out = tmp_path / "run"
    run([f"--init_from={model_dir}", f"--data={dataset}", "--max_steps=2", f"--out_dir={out}", *COMMON])
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["tokenizer"] != "byte" and "tokenizer.json" in saved["tokenizer"]  # the model's own, found by auto
    run([f"--init_from={model_dir}", f"--data={dataset}", "--max_steps=4", f"--out_dir={out}", "--resume", *COMMON])
    rows = metrics(out)
    assert [(r["step"], r["split"]) for r in rows if r["split"] == "eval"] == [(2, "eval"), (4, "eval")]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]

    # the checkpoint is a transformers checkpoint of the same architecture: same logits after reloading
    ckpt = checkpoint.model_dir(out)
    config = json.loads((ckpt / "config.json").read_text())
    original = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (original["model_type"], original["architectures"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    ours = Llama.from_pretrained(ckpt).eval()
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-4, atol=1e-5)

    # sample.py --chat: the model's template around the message, the reply without markup
    assert sample.main(["--ckpt", str(out), "--chat", "Hello <|im_end|> there", "--max_new_tokens", "6",
                        "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    assert "<|im_start|>" not in printed


def test_ddp_on_two_processes(tmp_path, dataset):
    model_dir = write_model("qwen2", tmp_path / "qwen2")
    out = tmp_path / "ddp"
    run([f"--init_from={model_dir}", f"--data={dataset}", "--max_steps=2", f"--out_dir={out}", *COMMON], nproc=2)
    assert [(r["step"], r["split"]) for r in metrics(out)][-1] == (2, "eval")
    transformers.AutoModelForCausalLM.from_pretrained(checkpoint.model_dir(out))


def test_readme_commands_run_on_the_tiny_model(tmp_path, dataset):
    """The README's "your own model" commands (data.py --show, train.py, sample.py --chat), their downloads replaced by
    the tiny model and dataset, train.py shortened to one small step."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- own-model-command -->\n```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(c, comments=True) for c in block.replace("\\\n", " ").splitlines()]
    model_dir = write_model("qwen2", tmp_path / "model")
    paths = {"Qwen2-0.5B-Instruct": str(model_dir), "ultrafeedback_binarized": str(dataset),
             "out/qwen2-tr-dpo": str(tmp_path / "run")}
    small = ["--max_steps=1", "--batch_size=2", "--micro_batch_size=1", "--max_length=96", "--max_prompt_length=64",
             "--eval_size=2", "--num_samples=1", "--max_new_tokens=4", "--dtype=float32"]
    ran = []
    for words in commands:
        if words[:2] == ["hf", "download"]:
            continue
        words = [paths.get(w, w) for w in words]
        words = [w.split("=")[0] + "=" + paths[w.split("=", 1)[1]] if "=" in w and w.split("=", 1)[1] in paths else w
                 for w in words]
        assert words[0] == "python", words
        extra = small if words[1] == "train.py" else ["--max_new_tokens", "4"] if words[1] == "sample.py" else []
        p = subprocess.run([sys.executable, *words[1:], *extra], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, f"{words}: " + p.stdout[-3000:] + p.stderr[-3000:]
        ran.append(words[1])
        if words[1] == "data.py":  # --show 2: two pairs as JSON lines, their prompt in the model's template
            shown = [json.loads(line) for line in p.stdout.splitlines()[:2]]
            assert all(r["text"]["prompt"].endswith("<|im_start|>assistant\n") for r in shown), shown
    assert ran == ["data.py", "train.py", "sample.py"]
