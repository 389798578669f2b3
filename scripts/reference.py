#!/usr/bin/env python3
"""Produce golden fixtures from an independent reference: Hugging Face transformers loading
the same GGUF file (weights dequantized to float32 by transformers/gguf-py, run in PyTorch).

Writes tests/fixtures/reference/<name>.json with
  - tokenizer cases: text -> ids (English, code, CJK, emoji, whitespace)
  - chat template renderings
  - the tokens of tests/fixtures/eval_text.txt, and per window of CTX tokens the reference
    log-prob of every scored token and its argmax, plus the perplexity.

Needs: pip install torch transformers gguf numpy (developer machines only; CI reads the
committed fixtures). Usage: scripts/reference.py smollm2|qwen-0.5b|gemma3-270m [--ctx 256]
[--windows 4] [--tag NAME]
"""
import argparse, json, math, os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path(os.environ.get("COORDGEN_MODELS", ROOT / "models"))
FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen-0.5b": "qwen2.5-coder-0.5b-instruct.gguf",
    "qwen-1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "gemma3-270m": "gemma-3-270m-q4_k_m.gguf",
}

TOKENIZER_CASES = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "It's 3:45pm; we'll ship v2.10.3 in 2026 -- don't   panic.\n\n",
    "def add(a, b):\n    return a + b  # sum\n\nfor i in range(10):\n\tprint(f\"{i:03d}\")\n",
    "fn main() { let v: Vec<u32> = (0..1_000).collect(); println!(\"{:?}\", &v[..3]); }",
    "机器学习是人工智能的一个分支。東京は日本の首都です。한국어 텍스트도 있습니다.",
    "Emoji test: 🎉🚀👍🏽 and 👨‍👩‍👧‍👦 family; flags 🇫🇷🇯🇵.",
    "   leading spaces, trailing spaces   \r\n mixed\twhitespace\u00a0nbsp",
    "<|im_start|>user\nhi<|im_end|>\n",
]

CHAT_CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Summarize: the cat sat on the mat."},
     {"role": "assistant", "content": "A cat sat on a mat."},
     {"role": "user", "content": "Shorter."}],
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("name", choices=sorted(FILES))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--text", default=str(ROOT / "tests/fixtures/eval_text.txt"))
    ap.add_argument("--tag", default="", help="suffix of the fixture's name (e.g. ctx1024)")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    gguf = FILES[args.name]
    tok = AutoTokenizer.from_pretrained(str(MODELS), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(MODELS), gguf_file=gguf, torch_dtype=torch.float32)
    model.eval()

    # A model file without a chat template gets the host's built-in one for its family
    # (runtime/host/templates/), rendered here by transformers' Jinja for comparison.
    builtin = {"gemma3-270m": ROOT / "runtime/host/templates/gemma.jinja"}
    if not getattr(tok, "chat_template", None) and args.name in builtin:
        tok.chat_template = builtin[args.name].read_text()

    out = {
        "model": gguf,
        "reference": f"transformers {transformers.__version__}, torch {torch.__version__}, float32",
        "tokenizer": [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids} for t in TOKENIZER_CASES],
        "chat": [{"messages": m, "rendered": tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)}
                 for m in CHAT_CASES],
    }
    text = Path(args.text).read_text()
    ids = tok(text, add_special_tokens=False).input_ids
    n_win = min(args.windows, len(ids) // args.ctx)
    ids = ids[: n_win * args.ctx]
    windows, nll, n = [], 0.0, 0
    with torch.no_grad():
        for w in range(n_win):
            win = ids[w * args.ctx:(w + 1) * args.ctx]
            logits = model(torch.tensor([win])).logits[0].double()
            lp = torch.log_softmax(logits, dim=-1)
            target = torch.tensor(win[1:])
            scored = lp[:-1].gather(1, target[:, None])[:, 0]
            nll -= scored.sum().item()
            n += len(win) - 1
            windows.append({"logprob": [round(x, 5) for x in scored.tolist()],
                            "argmax": logits[:-1].argmax(-1).tolist()})
    out["perplexity"] = {"ctx": args.ctx, "tokens": ids, "ppl": math.exp(nll / n), "n_scored": n, "windows": windows}
    if n_win == 0:
        sys.exit(f"the text has {len(ids)} tokens, fewer than one window of {args.ctx}")
    tag = f"-{args.tag}" if args.tag else ""
    dest = ROOT / "tests/fixtures/reference" / f"{args.name}{tag}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, ensure_ascii=False) + "\n")
    print(f"{args.name}: ppl {out['perplexity']['ppl']:.4f} over {n} tokens -> {dest}")


if __name__ == "__main__":
    sys.exit(main())
