#!/usr/bin/env python3
"""Drives an OpenAI-compatible server with 1, 2, 4, 8 concurrent streaming clients over the
shared prompts and reports, per concurrency: aggregate completion tokens/s, median time to
first token, and median per-client tokens/s (each a median over --runs rounds), plus the
ratio of aggregate throughput to one client's.

Starts `coordgen serve` itself (--serve "ARGS"), or measures a server already running at
--url (llama.cpp's llama-server, for a side-by-side run on the same machine). Python's
standard library only.

  scripts/bench_server.py --serve "-m qwen-1.5b -t 2 --parallel 8" --clients 1,2,4,8
  scripts/bench_server.py --url http://127.0.0.1:8081 --clients 1,2,4,8 --label llama-server

--shared-doc: in each round every client asks its own question about one document (a new
one per round), the case where a server's slots can share the document's prefill; compare
`--serve "... --no-prefix-sharing"` for the same run without sharing.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def load_prompts(path, max_chars, limit):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    rows = [r for r in rows if len(r["prompt"]) <= max_chars]
    return rows[:limit] if limit else rows


def one_request(url, prompt, max_tokens, model):
    """Streams one chat completion; returns (ttft_s, total_s, completion_tokens, decode_s)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=900)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:300]!r}")
    first = None
    tokens = None
    pieces = 0
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            tokens = ev["usage"]["completion_tokens"]
        for c in ev.get("choices", []):
            if (c.get("delta") or {}).get("content"):
                pieces += 1
                if first is None:
                    first = time.perf_counter()
    end = time.perf_counter()
    conn.close()
    if tokens is None:
        tokens = pieces
    first = first or end
    return first - t0, end - t0, tokens, max(end - first, 1e-9)


QUESTIONS = ["Summarize it in two sentences.", "What is the main point?", "List three facts from it.",
             "Who is it about?", "Give it a title.", "What happens first?", "What numbers does it give?",
             "Explain it to a child."]


def run_round(url, prompts, clients, per_client, max_tokens, model, nonce, shared_doc=None):
    """`clients` threads, each sending `per_client` requests one after another (with
    `shared_doc`, each asks its own question about that document)."""
    results, errors = [], []
    lock = threading.Lock()

    def client(ci):
        for k in range(per_client):
            if shared_doc is not None:
                # The round's nonce first: the document is new to the server each round.
                text = f"(round {nonce})\n{shared_doc}\n\nQuestion: {QUESTIONS[(ci * per_client + k) % len(QUESTIONS)]}"
            else:
                p = prompts[(ci * per_client + k) % len(prompts)]
                # A unique first line: no request finds its prompt cached from an earlier round.
                text = f"(request {nonce}-{ci}-{k})\n{p['prompt']}"
            try:
                r = one_request(url, text, max_tokens, model)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    total = sum(r[2] for r in results)
    return {
        "aggregate_tps": total / wall,
        "ttft_s": statistics.median(r[0] for r in results),
        "client_tps": statistics.median(r[2] / r[3] for r in results),
        "tokens": total,
    }


def wait_ready(url, proc, timeout=600):
    u = urllib.parse.urlparse(url)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("the server exited while starting")
        try:
            c = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become ready")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", help="arguments of `coordgen serve` (started on --port)")
    ap.add_argument("--url", help="a server already running")
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--coordgen", default=os.path.join(ROOT, "target", "debug", "coordgen"))
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client per round")
    ap.add_argument("--runs", type=int, default=3, help="rounds per concurrency (medians reported)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompts", default=os.path.join(ROOT, "..", "shared", "eval", "public.jsonl"))
    ap.add_argument("--max-prompt-chars", type=int, default=1200, help="skip longer prompts (prefill would dominate)")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--model", default="default")
    ap.add_argument("--label", default="coordgen")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--shared-doc", action="store_true", help="all clients of a round ask about one document (see above)")
    a = ap.parse_args()
    prompts = load_prompts(a.prompts, a.max_prompt_chars, a.limit)
    if not prompts:
        sys.exit("no prompts")
    proc = None
    url = a.url
    if a.serve:
        url = f"http://127.0.0.1:{a.port}"
        cmd = [a.coordgen, "serve", "--port", str(a.port)] + a.serve.split()
        print("starting:", " ".join(cmd), file=sys.stderr)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL if not os.environ.get("VERBOSE") else None)
    if not url:
        sys.exit("give --serve or --url")
    try:
        wait_ready(url, proc)
        if a.model == "default":
            try:
                u = urllib.parse.urlparse(url)
                c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                c.request("GET", "/v1/models")
                a.model = json.loads(c.getresponse().read())["data"][0]["id"]
            except Exception:  # noqa: BLE001 - any name works for llama-server
                a.model = "model"
        # Warm-up: one request (page cache, first allocations).
        run_round(url, prompts, 1, 1, 16, a.model, "warmup")
        table = []
        base = None
        for c in [int(x) for x in a.clients.split(",")]:
            rounds = [
                run_round(url, prompts, c, a.per_client, a.max_tokens, a.model, f"{c}-{r}",
                          prompts[(c * a.runs + r) % len(prompts)]["prompt"] if a.shared_doc else None)
                for r in range(a.runs)
            ]
            row = {
                "clients": c,
                "aggregate_tps": statistics.median(r["aggregate_tps"] for r in rounds),
                "ttft_s": statistics.median(r["ttft_s"] for r in rounds),
                "client_tps": statistics.median(r["client_tps"] for r in rounds),
                "runs": [round(r["aggregate_tps"], 2) for r in rounds],
            }
            base = base or row["aggregate_tps"]
            row["vs_one_client"] = row["aggregate_tps"] / base
            table.append(row)
            print(
                f"{a.label}: {c} clients: aggregate {row['aggregate_tps']:.2f} tok/s ({row['vs_one_client']:.2f}x one client), "
                f"TTFT {row['ttft_s']:.2f} s, per client {row['client_tps']:.2f} tok/s; runs {row['runs']}",
                flush=True,
            )
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"label": a.label, "max_tokens": a.max_tokens, "prompts": len(prompts), "rows": table}, f, indent=1)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
