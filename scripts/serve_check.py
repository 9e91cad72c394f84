"""A two-turn chat against `pio serve`, with and without prefix caching, plus a stream of the
second turn: checks that the cache is used, that answers do not change with it, and that the
stream adds up to the answer. Prints a JSON report.

    python3 scripts/serve_check.py PIO_BINARY GRAPHS_DIR [--ep cuda]

Result on an H100: benches/results/2026-11-26-h100-run2/serve-check.json.
"""
import argparse
import json
import subprocess
import time
import urllib.request


def start(pio, graphs, ep, extra):
    proc = subprocess.Popen([pio, "serve", "--graphs", graphs, "--ep", ep, "--port", "0"] + extra,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    if not line.startswith("listening on "):
        proc.kill()
        raise SystemExit(f"pio serve did not start: {line!r}")
    return proc, line[len("listening on "):]


def post(base, body):
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.time()
    with urllib.request.urlopen(request) as response:
        raw = response.read().decode()
    return raw, time.time() - start


def conversation(pio, graphs, ep, extra):
    proc, base = start(pio, graphs, ep, extra)
    try:
        system = {"role": "system", "content": "You are a helpful assistant. " * 40}
        turn1 = [system, {"role": "user", "content": "Tell me a story about a lighthouse."}]
        raw1, t1 = post(base, {"messages": turn1, "max_tokens": 24, "temperature": 0})
        answer1 = json.loads(raw1)
        turn2 = turn1 + [answer1["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        raw2, t2 = post(base, {"messages": turn2, "max_tokens": 24, "temperature": 0})
        answer2 = json.loads(raw2)
        raw_stream, _ = post(base, {"messages": turn2, "max_tokens": 24, "temperature": 0, "stream": True,
                                "stream_options": {"include_usage": True}})
        chunks = [json.loads(line[6:]) for line in raw_stream.splitlines() if line.startswith("data: {")]
        streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        return {
            "turn1": answer1["choices"][0]["message"]["content"], "turn1_usage": answer1["usage"], "turn1_s": t1,
            "turn2": answer2["choices"][0]["message"]["content"], "turn2_usage": answer2["usage"], "turn2_s": t2,
            "stream_equals_turn2": streamed == answer2["choices"][0]["message"]["content"],
            "stream_usage": chunks[-1].get("usage") if chunks else None,
            "done": raw_stream.rstrip().endswith("data: [DONE]"),
        }
    finally:
        proc.kill()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("pio")
    parser.add_argument("graphs")
    parser.add_argument("--ep", default="cuda")
    args = parser.parse_args()
    report = {label: conversation(args.pio, args.graphs, args.ep, extra)
              for label, extra in (("prefix_cache", []), ("no_prefix_cache", ["--no-prefix-cache"]))}
    report["same_turn1"] = report["prefix_cache"]["turn1"] == report["no_prefix_cache"]["turn1"]
    report["same_turn2"] = report["prefix_cache"]["turn2"] == report["no_prefix_cache"]["turn2"]
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
