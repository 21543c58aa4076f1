"""Judge runs side by side: generate from fixed prompts with fixed decoding, score every response with every judge,
and report quality against the KL to the initial policy (the paper's over-optimization figure, on any data).

    python evaluate.py --runs DPO=out/dpo --runs TR-DPO=out/tr-dpo-soft --judge gold            # the demo's runs
    python evaluate.py --runs DPO=out/dpo-s1,out/dpo-s2 --runs TR=out/tr-s1,out/tr-s2 --prompts hh/test.jsonl.gz \
        --judge /path/to/Skywork-Reward-V2-Llama-3.2-1B --judge /path/to/Skywork-Reward-V2-Qwen3-1.7B --last

A run group (--runs NAME=DIR[,DIR...]) is one setup trained with one or more seeds. Every checkpoint (ckpt-*) of each
run, or its newest with --last, and the run's initial policy (train_config.json's init_from: the SFT model, also for
TR runs, whose checkpoint's reference has moved) continue the same prompts: greedily, and --samples times at
temperature 1 from a generator seeded per chunk of --batch_size prompts (chunk c: --seed + c). Generations, their
log-probs and every judge's scores are cached per checkpoint (JSONL, one line per prompt, a chunk per write) under
--out/cache: another judge reuses the generations and a killed evaluation continues where it stopped.
Metrics and formulas: docs/evaluation.md. Win rates are named by their judge ("gold win rate", "local-RM win rate").
"""
import argparse
import functools
import hashlib
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import checkpoint
import data
import judge as judges
import losses
import synthetic
from winrates import distinct, length_controlled, percentile_ci, ratio_stat, resample_counts, win
from datafiles import choose_split
from model import Llama
from tokenizer import Tokenizer, find_tokenizer, get_tokenizer


class EvalError(ValueError):
    """A bad run, prompt set, judge or option: main() prints it as one line and exits with status 2."""


@dataclass
class Run:
    """One run directory (one seed of a group): its checkpoints, tokenizer and initial policy."""
    dir: Path
    config: dict  # train_config.json
    ckpts: list[Path]
    tokenizer: str
    init: Path | None  # the initial policy's model directory; None for a run trained from scratch
    caches: dict = field(default_factory=dict)  # step (0: the initial policy) -> cache directory


# ----------------------------------------------------------------------------------------------------------------------
# runs, prompts


@functools.lru_cache(maxsize=None)
def run_tokenizer(name: str) -> Tokenizer:
    try:
        return get_tokenizer(name)
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: tiktoken offline without its files
        raise EvalError(f"tokenizer {name}: {e}") from None


def read_run(run_dir: str, last: bool) -> Run:
    path = Path(run_dir)
    cfg_file = path / "train_config.json"
    if not cfg_file.is_file():
        raise EvalError(f"--runs {run_dir}: no train_config.json (not a train.py run directory)")
    ckpts = sorted(path.glob("ckpt-*[0-9]"))
    if not ckpts:
        raise EvalError(f"--runs {run_dir}: no checkpoints (ckpt-*) in this run directory")
    cfg = json.loads(cfg_file.read_text())
    own = find_tokenizer(ckpts[-1])
    init = None
    if cfg["init_from"] != "scratch":
        try:
            init = checkpoint.model_dir(cfg["init_from"])
        except ValueError as e:
            raise EvalError(f"--runs {run_dir}: its initial policy init_from={cfg['init_from']}: {e} (run evaluate.py "
                            f"from the directory the run was trained in)") from None
    return Run(path, cfg, ckpts[-1:] if last else ckpts, str(own) if own else cfg["tokenizer"], init)


def parse_groups(specs: list[str], last: bool) -> dict[str, list[Run]]:
    """--runs NAME=DIR[,DIR...] or DIR -> {name: [Run per seed]}; one group's seeds must share a tokenizer."""
    groups = {}
    for spec in specs:
        name, _, dirs = spec.rpartition("=")
        runs = [read_run(d, last) for d in dirs.split(",") if d]
        name = name or Path(dirs.split(",")[0]).name
        if not runs or name in groups:
            raise EvalError(f"--runs {spec}: " + ("no run directory" if not runs else f"a second group named {name}"))
        if len({r.tokenizer for r in runs}) > 1:
            raise EvalError(f"--runs {spec}: its seeds were trained with different tokenizers "
                            f"({', '.join(sorted({r.tokenizer for r in runs}))}); a group is one setup")
        groups[name] = runs
    return groups


def load_prompts(spec: str, split: str, cfg: dict, tok: Tokenizer, n: int) -> list:
    """The first n prompts (strings or chat messages, as data.Pair.prompt gives them) of a file or dataset split, or
    of the synthetic task's held-out examples for the run config cfg (the prompts train.py's evaluation continues):
    those data.tokenize keeps under cfg's max_length and max_prompt_length with the first run's tokenizer."""
    try:
        if spec == "synthetic":
            records = synthetic.make_records(synthetic.TRAIN_EXAMPLES + cfg["eval_size"], cfg["seed"],
                                             sft=cfg["loss"] == "sft")
            examples = data.from_records(records[:cfg["eval_size"]], source="synthetic")
        else:  # a dataset directory's held-out split unless --split names one
            split = choose_split(Path(spec), split, "eval") if Path(spec).is_dir() else "auto"
            examples = data.read_examples(spec, split=split)
        kind = "pairs" if examples and isinstance(examples[0], data.Pair) else "sft"
        items = data.tokenize(examples, tok, kind, cfg["max_length"], cfg["max_prompt_length"]).items if examples \
            else []
    except (data.DataError, ValueError, OSError) as e:
        raise EvalError(f"--prompts {spec}: {e}") from None
    if not items:
        raise EvalError(f"--prompts {spec}: no prompts (no example left after tokenisation)")
    return [examples[it.group].prompt for it in items[:n]]


def encode_prompts(prompts: list, tok: Tokenizer, max_prompt_length: int) -> list[list[int]]:
    """Token ids of each prompt as data.tokenize makes them: rendered, cut from the left keeping BOS."""
    ids = tok.ids(*[tok.render(p)[0] for p in prompts])
    keep = [int(tok.bos_id is not None and p[:1] == [tok.bos_id]) for p in ids]
    out = [p if len(p) <= max_prompt_length else p[:k] + p[len(p) - max_prompt_length + k:] for p, k in zip(ids, keep)]
    if not all(out):
        raise EvalError(f"tokenizer {tok.name}: prompt {[len(p) for p in out].index(0) + 1} is empty and the tokenizer "
                        f"has no BOS")
    return out


# ----------------------------------------------------------------------------------------------------------------------
# the cache: one directory per (model, tokenizer, prompts, decoding); generations.jsonl and judge-<key>.jsonl hold
# one line per prompt {"i": index, ...}, appended a chunk at a time, so a killed evaluation loses at most one chunk


def cache_dir(root: Path, model_dir: Path, settings: dict) -> Path:
    key = json.dumps({"model": str(model_dir.resolve()), **settings}, sort_keys=True)
    name = f"{model_dir.parent.name}-{model_dir.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "settings.json").write_text(key)
    return root / name


def read_lines(file: Path) -> dict[int, dict]:
    """{i: row} of a cache file; a half-written last line (a killed write) is ignored."""
    if not file.is_file():
        return {}
    rows = [json.loads(line) for line in file.read_text().splitlines(keepends=True) if line.endswith("\n")]
    return {r["i"]: r for r in rows}


def append_lines(file: Path, rows: list[dict]):
    with open(file, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def complete(cache: Path, n: int, name: str = "generations.jsonl") -> bool:
    return all(i in read_lines(cache / name) for i in range(n))


# ----------------------------------------------------------------------------------------------------------------------
# generation and log-probs


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()


@torch.no_grad()
def sequence_logps(model: Llama, prompts: list[list[int]], responses: list[list[int]], pad_id: int, device,
                   rows: int = 8) -> tuple[list[float], list[float]]:
    """(log π(y|x) summed over each response's tokens, the end token included, and the token counts), as train.py's
    evaluation computes them for its KL estimates; `rows` sequences per forward bound the (rows, T, vocab) logits."""
    logps, counts = [], []
    for i in range(0, len(prompts), rows):
        ids, mask = data.pad(list(zip(prompts[i:i + rows], responses[i:i + rows])), pad_id)
        ids, mask = ids.to(device), mask.to(device)
        keep = losses.logits_to_keep(mask)
        lp, n = losses.sequence_logps(model(ids, logits_to_keep=keep), ids[:, -keep:], mask[:, -keep:])
        logps, counts = logps + lp.tolist(), counts + n.tolist()
    return logps, counts


def generate(cache: Path, model: Llama, tok: Tokenizer, prompts: list[list[int]], args, device,
             scorers: dict[str, Llama] | None = None) -> int:
    """Fill cache/generations.jsonl: per prompt the greedy response and args.samples sampled ones (token ids, the end
    token kept when one ended the response) and, for each scorer {"policy", "init", "ref"}, the sampled responses'
    summed log-probs. Chunks already cached are skipped; returns how many prompts were generated."""
    file, done, made = cache / "generations.jsonl", read_lines(cache / "generations.jsonl"), 0
    for c, idx in enumerate(chunks(len(prompts), args.batch_size)):
        if all(i in done for i in idx):
            continue
        rows = [prompts[i] for i in idx]
        kw = dict(stop_ids=tok.end_ids, n_vocab=tok.n_vocab)
        gen = torch.Generator(device=device).manual_seed(args.seed + c)  # chunk 0 of a run: train.py's eval draws
        with autocast(device, args.dtype):
            greedy = model.generate(rows, args.max_new_tokens, temperature=0.0, **kw)
            samples = [model.generate(rows, args.max_new_tokens, temperature=1.0, generator=gen, **kw)
                       for _ in range(args.samples)]
            logps = {}  # name -> (K * len(rows),), sample-major
            for name, m in (scorers or {}).items():
                logps[name], logps["tokens"] = sequence_logps(m, rows * args.samples, [r for s in samples for r in s],
                                                              tok.pad_id, device)
        append_lines(file, [{"i": i, "greedy": greedy[j], "samples": [s[j] for s in samples],
                             "logps": {k: v[j::len(rows)] for k, v in logps.items()}} for j, i in enumerate(idx)])
        made += len(idx)
    return made


def load_model(path: Path, device) -> Llama:
    try:
        return Llama.from_pretrained(path).to(device).eval()
    except (ValueError, OSError) as e:
        raise EvalError(f"{path}: {e}") from None


def generate_all(groups: dict[str, list[Run]], prompts: list, args, device, log) -> dict:
    """Generations (and log-probs for KL) of every checkpoint and initial policy, cached; returns timings."""
    root, timings = Path(args.out) / "cache", {}
    settings = dict(samples=args.samples, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    batch_size=args.batch_size, dtype=args.dtype, prompts=hashlib.sha1(
                        json.dumps(prompts).encode()).hexdigest())
    for runs in groups.values():
        for run in runs:
            tok = run_tokenizer(run.tokenizer)
            ids = encode_prompts(prompts, tok, args.max_prompt_length)
            s = {**settings, "tokenizer": run.tokenizer}
            init = None
            if run.init is not None:
                run.caches[0] = cache_dir(root, run.init, s)
                if not complete(run.caches[0], len(ids)):
                    init = load_model(run.init, device)
                    generate(run.caches[0], init, tok, ids, args, device)
            for ckpt in run.ckpts:
                step = int(ckpt.name.split("-")[1])
                run.caches[step] = cache = cache_dir(root, ckpt, s)
                if complete(cache, len(ids)):
                    continue
                t0 = time.perf_counter()
                policy = load_model(ckpt, device)
                scorers = {"policy": policy}
                if run.init is not None:
                    scorers["init"] = init = init or load_model(run.init, device)
                if run.config.get("ref_update", "static") != "static" and (ckpt / "reference").is_dir():
                    scorers["ref"] = load_model(ckpt / "reference", device)
                made = generate(cache, policy, tok, ids, args, device, scorers)
                timings[str(ckpt)] = {"prompts": made, "seconds": time.perf_counter() - t0}
                log(f"{ckpt}: {made} prompts x (1 greedy + {args.samples} samples) in "
                    f"{timings[str(ckpt)]['seconds']:.1f}s")
    return timings


# ----------------------------------------------------------------------------------------------------------------------
# judging: every response of every cache scored by every judge (its own tokenizer and template: judge.py)


CUT = ("truncated", "responses_cut")  # a judge's counts of (prompt, response) sequences cut to its context


def judge_key(spec: str) -> str:
    path = Path(spec).resolve()
    return "gold" if spec == "gold" else f"{path.name}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def response_text(ids: list[int], tok: Tokenizer) -> str:
    """A response as text: its end token (EOS, end of turn), if one ended it, left out."""
    return tok.decode(ids[:-1] if ids and ids[-1] in tok.end_ids else ids)


def load_judges(args) -> dict:
    """{key: (option, spec, judge)}, loaded before any generation: a bad judge stops the evaluation before it costs
    anything."""
    out = {}
    for option, spec, load in [("judge", s, judges.load_judge) for s in args.judge] + \
            [("pairwise_judge", args.pairwise_judge, judges.load_pairwise_judge)] * bool(args.pairwise_judge):
        try:
            out[judge_key(spec) + "-pairwise" * (option == "pairwise_judge")] = (option, spec,
                                                                                 load(spec, device=args.device))
        except (ValueError, OSError) as e:
            raise EvalError(f"--{option} {spec}: {e}") from None
    return out


def score_all(groups: dict[str, list[Run]], prompts: list, loaded: dict, args, log) -> dict:
    """Cache every judge's verdicts on every response, judge-<key>.jsonl, a line per prompt {"i", "greedy",
    "samples"}: a judge's score of each response; a pairwise judge's [P(a first better), P(b first better)] of each
    (checkpoint's response a, π_init's response b) pair, asked in both orders. Returns {key: {"spec", "label",
    "seconds", "truncated", "responses_cut"}}: the sequences the judge cut to its context, from the left (BOS kept),
    and those of them cut into the response (longer than the context alone)."""
    out = {}
    for key, (option, spec, judge) in loaded.items():
        t0, files, pairwise = time.perf_counter(), set(), isinstance(judge, judges.PairwiseJudge)
        for run in (run for runs in groups.values() for run in runs):
            tok = run_tokenizer(run.tokenizer)
            for step, cache in run.caches.items():
                if pairwise and (step == 0 or 0 not in run.caches):
                    continue
                file = cache / f"judge-{key}.jsonl"
                gens, done = read_lines(cache / "generations.jsonl"), read_lines(file)
                other = read_lines(run.caches[0] / "generations.jsonl") if pairwise else None
                files.add(file)
                for idx in chunks(len(prompts), args.batch_size):
                    if all(i in done for i in idx):
                        continue
                    before = [getattr(judge, c, 0) for c in CUT]
                    try:
                        rows = judge_chunk(judge, idx, prompts, gens, other, tok)
                    except ValueError as e:  # a sequence the judge refuses
                        raise EvalError(f"--{option} {spec}: {e}") from None
                    rows[0] |= {c: getattr(judge, c, 0) - b for c, b in zip(CUT, before)}
                    append_lines(file, rows)
        kind = "gold" if spec == "gold" else "pairwise" if pairwise else "local-RM"
        out[key] = {"spec": spec, "label": kind if spec == "gold" else f"{kind} {judge.name}", "pairwise": pairwise,
                    "seconds": time.perf_counter() - t0,
                    **{c: sum(r.get(c, 0) for f in files for r in read_lines(f).values()) for c in CUT}}
        log(f"judge {out[key]['label']}: scored in {out[key]['seconds']:.1f}s; {out[key]['truncated']} sequence(s) "
            f"cut to its context from the left, {out[key]['responses_cut']} of them into the response")
    return out


def judge_chunk(judge, idx: range, prompts: list, gens: dict, other: dict | None, tok: Tokenizer) -> list[dict]:
    """One chunk's lines: the scores of the greedy and sampled responses, or (other: π_init's generations) the
    pairwise judge's probabilities for each of them against π_init's response with the same index."""
    def texts(g: dict) -> list[str]:
        return [response_text(r, tok) for r in [g["greedy"], *g["samples"]]]
    a = [x for i in idx for x in texts(gens[i])]
    ps = [prompts[i] for i in idx for _ in range(1 + len(gens[i]["samples"]))]
    if other is None:
        verdicts = iter(judge.score(ps, a))
    else:
        b = [x for i in idx for x in texts(other[i])]
        verdicts = iter(zip(judge.prob_first(ps, a, b), judge.prob_first(ps, b, a)))
    return [{"i": i, "greedy": next(verdicts), "samples": [next(verdicts) for _ in gens[i]["samples"]]} for i in idx]


# ----------------------------------------------------------------------------------------------------------------------
# metrics per checkpoint (formulas: docs/evaluation.md)


def load_cache(cache: Path, tok: Tokenizer, n: int, keys: list[str], max_new_tokens: int) -> dict:
    """One cache as arrays over prompts (n,) and samples (n, K): lengths, texts, log-probs, scores."""
    gens = read_lines(cache / "generations.jsonl")
    gens = [gens[i] for i in range(n)]
    ended = np.array([[bool(s) and s[-1] in tok.end_ids for s in g["samples"]] for g in gens])
    ntok = np.array([[len(s) for s in g["samples"]] for g in gens]) - ended
    texts = [[response_text(s, tok) for s in g["samples"]] for g in gens]
    out = {"ntok": ntok, "hit_max": (ntok == max_new_tokens) & ~ended, "texts": texts,
           "chars": np.array([[len(t) for t in ts] for ts in texts], float),
           "logps": {k: np.array([g["logps"][k] for g in gens]) for k in gens[0]["logps"]}, "scores": {}}
    for key in keys:
        rows = read_lines(cache / f"judge-{key}.jsonl")
        if not rows:  # a pairwise judge's verdicts are on the checkpoints' caches only
            continue
        out["scores"][key] = (np.array([rows[i]["greedy"] for i in range(n)]),
                              np.array([rows[i]["samples"] for i in range(n)]))
    return out


def step_metrics(pol: list[dict], init: list[dict] | None, keys: list[str], cs, cp) -> dict:
    """Metrics of one group at one step: pol holds each seed's cache, init each seed's initial policy's (None: the
    group's initial policies themselves, or none)."""
    def stack(get):
        return np.stack([get(c) for c in pol])

    ones = np.ones(stack(lambda c: c["ntok"]).shape[:2])
    m = {"length_mean": ratio_stat(stack(lambda c: c["ntok"].mean(-1)), ones, cs, cp),
         "length_median": float(np.median(stack(lambda c: c["ntok"]))),
         "hit_max_new_tokens": ratio_stat(stack(lambda c: c["hit_max"].mean(-1)), ones, cs, cp)}
    for n in (1, 2):
        d = stack(lambda c: np.array([distinct(ts, n) for ts in c["texts"]]))
        m[f"distinct_{n}"] = ratio_stat(d[..., 0], d[..., 1], cs, cp)
    for name, other in (("kl_init", "init"), ("kl_ref", "ref")):
        if all(other in c["logps"] for c in pol):
            diff = stack(lambda c: c["logps"]["policy"] - c["logps"][other])
            m[name] = ratio_stat(diff.mean(-1), ones, cs, cp)
            m[name + "_per_token"] = ratio_stat(diff.sum(-1), stack(lambda c: c["logps"]["tokens"].sum(-1)), cs, cp)
    wins = {}  # key -> the win of each sample against π_init's (S, n, K), for the judges' agreement
    for key in keys:
        if key not in pol[0]["scores"]:  # a pairwise judge on π_init itself
            continue
        g, s = stack(lambda c: c["scores"][key][0]), stack(lambda c: c["scores"][key][1])
        if g.ndim == 3:  # a pairwise judge's [P(a first), P(b first)]: a's win is decided in both orders
            decide = np.vectorize(judges.decide)
            (wg, _), (wins[key], dis) = decide(g[..., 0], g[..., 1]), decide(s[..., 0], s[..., 1])
            m[key] = {"disagreement": ratio_stat(dis.mean(-1), ones, cs, cp)}
        else:
            m[key] = {"score_greedy": ratio_stat(g, ones, cs, cp),
                      "score_sampled": ratio_stat(s.mean(-1), ones, cs, cp)}
            if init is None:
                continue
            ig, i_s = (np.stack([c["scores"][key][j] for c in init]) for j in (0, 1))
            wg, wins[key] = win(g, ig), win(s, i_s)
        dchars = stack(lambda c: c["chars"]) - np.stack([c["chars"] for c in init])
        m[key] |= {"win_greedy": ratio_stat(wg, ones, cs, cp), "win_sampled": ratio_stat(wins[key].mean(-1), ones, cs,
                                                                                          cp),
                   "lc_win_sampled": length_controlled(wins[key], dchars, cs, cp)}
    keys = list(wins)  # how often two judges order a (policy, π_init) sample pair alike, of those both decide (no tie)
    if len(keys) > 1:
        decided = {(a, b): (wins[a] != 0.5) & (wins[b] != 0.5) for i, a in enumerate(keys) for b in keys[i + 1:]}
        m["agreement"] = {f"{a} ~ {b}": ratio_stat(((wins[a] == wins[b]) & d).sum(-1), d.sum(-1), cs, cp)
                          | {"decided": float(d.mean())} for (a, b), d in decided.items()}
    return m


def head_to_head(a: list[dict], b: list[dict], key: str, csa, csb, cp) -> dict:
    """Win rate of group a's responses against group b's on the same prompts and sample index, every seed of a
    against every seed of b: W[s, t, p] = mean_k win(a_s, b_t); bootstrap over both groups' seeds and the prompts."""
    out = {}
    for j, name in ((0, "win_greedy"), (1, "win_sampled")):
        sa, sb = (np.stack([c["scores"][key][j] for c in g]) for g in (a, b))
        W = win(sa[:, None], sb[None])
        W = W.mean(-1) if j else W
        num = np.einsum("bs,bt,bp,stp->b", csa, csb, cp, W)
        den = np.einsum("bs,bt,bp->b", csa, csb, cp) * 1.0
        out[name] = {"value": float(W.mean()), "ci": percentile_ci(num / den)}
    return out


def metrics(groups: dict[str, list[Run]], n: int, keys: list[str], args) -> tuple[list, list]:
    """(rows: one per group and step, step 0 being the initial policies; head-to-head rows between groups)."""
    cp = resample_counts(n, args.bootstrap, np.random.default_rng(args.seed))
    loaded, rows, h2h = {}, [], []
    for gi, (name, runs) in enumerate(groups.items()):
        S = len(runs)
        cs = resample_counts(S, args.bootstrap, np.random.default_rng(args.seed + 1 + gi))
        toks = [run_tokenizer(r.tokenizer) for r in runs]
        caches = [{step: load_cache(c, tok, n, keys, args.max_new_tokens) for step, c in r.caches.items()}
                  for r, tok in zip(runs, toks)]
        has_init = all(0 in c for c in caches)
        steps = sorted(set.intersection(*(set(c) for c in caches)))
        loaded[name] = (caches, cs)
        for step in steps:
            init = [c[0] for c in caches] if has_init and step else None
            rows.append({"run": name, "step": step, "seeds": S, "caches": [str(r.caches[step]) for r in runs],
                         **step_metrics([c[step] for c in caches], init, keys, cs, cp)})
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (ca, csa), (cb, csb) = loaded[a], loaded[b]
            for step in sorted(set.intersection(*(set(c) for c in ca + cb)) - {0}):
                for key in (k for k in keys if not k.endswith("-pairwise")):  # a pairwise judge: against π_init only
                    h2h.append({"a": a, "b": b, "step": step, "judge": key,
                                **head_to_head([c[step] for c in ca], [c[step] for c in cb], key, csa, csb, cp)})
    return rows, h2h


# ----------------------------------------------------------------------------------------------------------------------
# the report: JSON, a markdown table, the over-optimization figure


def fmt(stat: dict | None) -> str:
    if not stat or stat.get("value") is None:
        return "-"
    lo, hi = stat["ci"]
    return f"{stat['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")


def markdown(report: dict) -> str:
    judges_, rows = report["judges"], report["rows"]
    out = [f"prompts: {report['prompts']['n']} ({report['prompts']['source']}); decoding: greedy and "
           f"{report['settings']['samples']} sample(s) at temperature 1, seed {report['settings']['seed']}, at most "
           f"{report['settings']['max_new_tokens']} new tokens; [95% bootstrap CI over prompts, and seeds where a "
           f"run has several]; step 0: the initial policy π_init", ""]
    for key, j in judges_.items():
        label = j["label"]
        cols = [("win rate vs π_init, greedy", "win_greedy"), ("win rate vs π_init, sampled", "win_sampled"),
                ("length-controlled", "lc_win_sampled")]
        cols = cols + [("orders disagree", "disagreement")] if j["pairwise"] else \
            [("score, greedy", "score_greedy"), ("score, sampled", "score_sampled")] + cols
        out += [f"**{label}** ({'a chat model asked in both orders' if j['pairwise'] else 'mean score'}; win rate "
                f"against π_init's response to the same prompt, ties ½)", "",
                "| run | step | " + " | ".join(f"{label} {c}" for c, _ in cols) + " | KL(π‖π_init) |",
                "|---" * (len(cols) + 3) + "|"]
        out += [f"| {r['run']} | {r['step']} | " + " | ".join(fmt(r.get(key, {}).get(k)) for _, k in cols)
                + f" | {fmt(r.get('kl_init'))} |" for r in rows]
        out.append("")
    out += ["**policy** (over the sampled responses; KL in nats, the sample-based estimate Σ log π − log π_init)", "",
            "| run | step | KL(π‖π_init) per sequence | per token | KL(π‖π_ref) per sequence | length mean (tokens) | "
            "median | hit max_new_tokens | distinct-1 | distinct-2 |", "|---" * 10 + "|"]
    out += [f"| {r['run']} | {r['step']} | {fmt(r.get('kl_init'))} | {fmt(r.get('kl_init_per_token'))} | "
            f"{fmt(r.get('kl_ref'))} | {fmt(r['length_mean'])} | {r['length_median']:g} | "
            f"{fmt(r['hit_max_new_tokens'])} | {fmt(r['distinct_1'])} | {fmt(r['distinct_2'])} |" for r in rows]
    if report["head_to_head"]:
        out += ["", "**head to head** (win rate of the first run's responses against the second's, same prompts, same "
                "step)", "", "| judge | step | runs | win rate, greedy | win rate, sampled |", "|---" * 5 + "|"]
        out += [f"| {judges_[h['judge']]['label']} | {h['step']} | {h['a']} vs {h['b']} | {fmt(h['win_greedy'])} | "
                f"{fmt(h['win_sampled'])} |" for h in report["head_to_head"]]
    agree = [(r, pair, stat) for r in rows for pair, stat in r.get("agreement", {}).items()]
    if agree:
        out += ["", "**judge agreement** (of the (policy, π_init) sample pairs both judges decide, neither a tie, the "
                "share they order alike; decided: the share of pairs both decide)", "",
                "| run | step | judges | agreement | decided |", "|---" * 5 + "|"]
        out += [f"| {r['run']} | {r['step']} | {' ~ '.join(judges_[k]['label'] for k in pair.split(' ~ '))} | "
                f"{fmt(stat)} | {stat['decided']:.2f} |" for r, pair, stat in agree]
    return "\n".join(out) + "\n"


def plot(report: dict, path: Path) -> bool:
    """Score and win rate against KL(π‖π_init) per run, one point per checkpoint (step 0: π_init at KL 0)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = list(report["judges"])
    fig, axes = plt.subplots(len(keys), 2, figsize=(10, 3.6 * len(keys)), squeeze=False)
    for row, key in zip(axes, keys):
        label = report["judges"][key]["label"]
        for ax, stat, ylabel in ((row[0], "score_sampled", "score (sampled)"),
                                 (row[1], "win_sampled", "win rate vs π_init")):
            for name in dict.fromkeys(r["run"] for r in report["rows"]):
                at_0 = {"win_sampled": {"value": 0.5, "ci": [0.5, 0.5]}}  # π_init against itself
                pts = [(r["kl_init"]["value"] if r["step"] else 0.0, r.get(key, {}).get(stat) or at_0.get(stat))
                       for r in report["rows"] if r["run"] == name and (r["step"] == 0 or "kl_init" in r)]
                pts = [(x, s) for x, s in pts if s]
                if pts:
                    y = np.array([s["value"] for _, s in pts])
                    ax.errorbar([x for x, _ in pts], y, yerr=np.abs(np.array([s["ci"] for _, s in pts]).T - y),
                                marker="o", capsize=2, label=name)
            ax.set(xlabel="KL(π‖π_init), nats per response", ylabel=f"{label} {ylabel}")
        row[1].axhline(0.5, color="grey", lw=0.5)
        if row[1].get_legend_handles_labels()[0]:  # runs trained from scratch have no KL to draw against
            row[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def evaluate(args, log=print) -> dict:
    """The whole evaluation of parsed arguments: returns the report (also written to --out as JSON and markdown)."""
    groups = parse_groups(args.runs, args.last)
    first = next(iter(groups.values()))[0]
    cfg = first.config
    args.max_new_tokens = args.max_new_tokens or cfg["max_new_tokens"]
    args.max_prompt_length = args.max_prompt_length or cfg["max_prompt_length"]
    spec = args.prompts or ("synthetic" if cfg["data"] == "synthetic" else None)
    if spec is None:
        raise EvalError(f"--prompts is needed: {first.dir} trained on {cfg['data']} (give its held-out file)")
    prompts = load_prompts(spec, args.split, cfg, run_tokenizer(first.tokenizer),
                           args.num_prompts or cfg["num_samples"])
    tokenizers = sorted({r.tokenizer for runs in groups.values() for r in runs})
    if len(tokenizers) > 1:
        log(f"note: the runs use {len(tokenizers)} tokenizers: head-to-head compares texts; KL, per-token KL and "
            f"lengths in tokens are each run's own (π and π_init share its tokenizer), not comparable across them")
    device = torch.device(args.device)
    out = Path(args.out)
    loaded = load_judges(args)
    timing = generate_all(groups, prompts, args, device, log)
    judged = score_all(groups, prompts, loaded, args, log)
    rows, h2h = metrics(groups, len(prompts), list(judged), args)
    report = {"settings": {k: v for k, v in vars(args).items()}, "prompts": {"source": spec, "n": len(prompts)},
              "tokenizers": tokenizers, "judges": judged, "timing": timing, "rows": rows, "head_to_head": h2h,
              "runs": {name: [str(r.dir) for r in runs] for name, runs in groups.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    (out / "report.md").write_text(table)
    log(table)
    if plot(report, out / "overoptimization.png"):
        log(f"figure: {out / 'overoptimization.png'}")
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", action="append", required=True, help="NAME=DIR[,DIR...] (one setup, its seeds) or DIR; "
                   "repeatable")
    p.add_argument("--judge", action="append", default=[], help="'gold' (the synthetic task's gold reward) or a "
                   "reward-model directory; repeatable")
    p.add_argument("--pairwise_judge", help="a chat model's directory, asked which of two responses is better (in "
                   "both orders) against π_init's; an option beside the reward models")
    p.add_argument("--prompts", help="a held-out file or dataset directory (data.read_examples), or 'synthetic'; "
                   "default: synthetic for runs trained on it")
    p.add_argument("--split", default="auto", help="the split of a --prompts dataset directory (auto: its held-out "
                   "split: test, test_prefs, validation, ...)")
    p.add_argument("--num_prompts", type=int, help="the first N prompts (default: the first run's num_samples)")
    p.add_argument("--samples", type=int, default=4, help="K samples per prompt at temperature 1")
    p.add_argument("--max_new_tokens", type=int, help="default: the first run's")
    p.add_argument("--max_prompt_length", type=int, help="prompts cut from the left (default: the first run's)")
    p.add_argument("--last", action="store_true", help="only each run's newest checkpoint")
    p.add_argument("--seed", type=int, default=1337, help="sampling seed (chunk c draws from seed + c) and the "
                   "bootstrap's")
    p.add_argument("--batch_size", type=int, default=64, help="prompts per generation chunk (a cache write)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16: autocast")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out/eval", help="report.json, report.md, overoptimization.png, cache/")
    args = p.parse_args(argv)
    for name in ("num_prompts", "samples", "max_new_tokens", "max_prompt_length", "batch_size", "bootstrap"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not args.judge or len(set(args.judge)) < len(args.judge):
        p.error("give each --judge once (gold, or a reward-model directory), at least one")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args)
    except (EvalError, checkpoint.CheckpointError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
