#!/usr/bin/env python3
"""PyTorch baseline for batch decode: Qwen3 with a static KV cache, the whole decode step captured in one CUDA graph.

    python3 scripts/torch_cudagraph_baseline.py --config DIR/config.json --batches 1,32 --prompt-len 128 \
        --new-tokens 128 --out result.json
    python3 scripts/torch_cudagraph_baseline.py --check        # CPU: the step equals transformers' Qwen3 (tiny model)

The model is written out here (embedding, RMSNorm, q/k RMSNorm, rotary, grouped-query attention over a static cache,
SwiGLU MLP, lm_head, argmax) so that nothing in the decode step leaves the GPU: the step reads the token ids and the
position from device tensors, writes the new K/V into the cache with index_copy_, attends over the whole cache with
a position mask (scaled_dot_product_attention), and writes the argmax token back, so one CUDA graph replay is one
token for every sequence. Weights are random bf16 at the config's real shapes (speed does not depend on values), and
gate/up are one matmul, q/k/v one matmul, as a careful hand-written PyTorch decoder would have them. The prefill is
not timed (it runs uncaptured); tokens_per_s = batch * decoded tokens / decode time, GPU synchronized around it.
`--check` builds a tiny random Qwen3 with transformers, copies its weights in, and asserts that the greedy tokens of
16 decode steps and the logits match transformers' (fp32, CPU), so the baseline is a real Qwen3 step.
"""

import argparse
import json
import math
import platform
import sys
import time

import torch
import torch.nn.functional as F


class Qwen3Static(torch.nn.Module):
    def __init__(self, cfg, batch, capacity, dtype, device):
        super().__init__()
        self.cfg = cfg
        h = cfg["hidden_size"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_dim = cfg.get("head_dim") or h // self.heads
        self.layers = cfg["num_hidden_layers"]
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        inter = cfg["intermediate_size"]
        vocab = cfg["vocab_size"]
        theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
        kw = dict(dtype=dtype, device=device)

        def w(*shape, std=None):
            std = std if std is not None else 1.0 / math.sqrt(shape[0])
            return torch.randn(*shape, **kw) * std

        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.embed = w(vocab, h, std=0.02)
        self.lm_head = self.embed.t() if cfg.get("tie_word_embeddings") else w(h, vocab)
        self.wqkv = [w(h, q_out + 2 * kv_out) for _ in range(self.layers)]
        self.wo = [w(q_out, h) for _ in range(self.layers)]
        self.wgu = [w(h, 2 * inter) for _ in range(self.layers)]
        self.wdown = [w(inter, h) for _ in range(self.layers)]
        self.norm_in = [torch.ones(h, **kw) for _ in range(self.layers)]
        self.norm_post = [torch.ones(h, **kw) for _ in range(self.layers)]
        self.q_norm = [torch.ones(self.head_dim, **kw) for _ in range(self.layers)]
        self.k_norm = [torch.ones(self.head_dim, **kw) for _ in range(self.layers)]
        self.norm_final = torch.ones(h, **kw)
        inv = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim))
        t = torch.arange(capacity, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        self.k_cache = [torch.zeros(shape, **kw) for _ in range(self.layers)]
        self.v_cache = [torch.zeros(shape, **kw) for _ in range(self.layers)]
        self.capacity = capacity
        self.positions = torch.arange(capacity, device=device)

    def rms(self, x, weight):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    @staticmethod
    def rotate_half(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    def step(self, ids, pos):
        """ids (B, S) at positions pos .. pos+S-1 (pos: a 1-element device tensor); returns last logits (B, V)."""
        b, s = ids.shape
        hd, nh, nkv = self.head_dim, self.heads, self.kv_heads
        idx = pos + torch.arange(s, device=ids.device)
        cos, sin = self.cos[idx][None, None], self.sin[idx][None, None]
        # Keys at or before each query's position are visible.
        mask = (self.positions[None, :] <= idx[:, None])[None, None]
        x = self.embed[ids]
        for i in range(self.layers):
            h = self.rms(x, self.norm_in[i])
            qkv = h @ self.wqkv[i]
            q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
            q = self.rms(q.view(b, s, nh, hd), self.q_norm[i]).transpose(1, 2)
            k = self.rms(k.view(b, s, nkv, hd), self.k_norm[i]).transpose(1, 2)
            v = v.view(b, s, nkv, hd).transpose(1, 2)
            q = q * cos + self.rotate_half(q) * sin
            k = k * cos + self.rotate_half(k) * sin
            self.k_cache[i].index_copy_(2, idx, k)
            self.v_cache[i].index_copy_(2, idx, v)
            att = F.scaled_dot_product_attention(q, self.k_cache[i], self.v_cache[i], attn_mask=mask, enable_gqa=True)
            x = x + att.transpose(1, 2).reshape(b, s, nh * hd) @ self.wo[i]
            h = self.rms(x, self.norm_post[i])
            gate, up = (h @ self.wgu[i]).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ self.wdown[i]
        x = self.rms(x[:, -1], self.norm_final)
        return (x @ self.lm_head).float()


def bench(cfg, batch, prompt_len, new_tokens, dtype, device, repeats):
    capacity = prompt_len + new_tokens + 1
    torch.manual_seed(0)
    m = Qwen3Static(cfg, batch, capacity, dtype, device)
    vocab = cfg["vocab_size"]
    prompt = torch.randint(0, vocab, (batch, prompt_len), device=device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)

    def decode_step():
        token.copy_(m.step(token, pos).argmax(-1, keepdim=True))
        pos.add_(1)

    def prefill():
        pos.zero_()
        token.copy_(m.step(prompt, pos).argmax(-1, keepdim=True))
        pos.fill_(prompt_len)

    # Warm up on a side stream (as torch.cuda.graphs requires), then capture one decode step.
    prefill()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            decode_step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step()
    times = []
    for _ in range(repeats):
        prefill()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    t = times[len(times) // 2]
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "ms_per_step": t / new_tokens * 1e3,
        "tokens_per_s": batch * new_tokens / t,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
    }


def check():
    """The step equals transformers' Qwen3 on a tiny random model (fp32, CPU)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf_cfg = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=128, rope_theta=10000.0, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    ref = Qwen3ForCausalLM(hf_cfg).eval()
    for p in ref.parameters():  # norms away from 1 so a missing norm would show
        torch.nn.init.normal_(p, std=0.1 if p.dim() > 1 else 0.5)
    cfg = hf_cfg.to_dict()
    cfg["rope_theta"] = 10000.0
    m = Qwen3Static(cfg, 1, 64, torch.float32, "cpu")
    sd = ref.state_dict()
    m.embed = sd["model.embed_tokens.weight"]
    m.lm_head = sd["lm_head.weight"].t()
    m.norm_final = sd["model.norm.weight"]
    for i in range(m.layers):
        p = f"model.layers.{i}."
        m.wqkv[i] = torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]).t()
        m.wo[i] = sd[p + "self_attn.o_proj.weight"].t()
        m.wgu[i] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]).t()
        m.wdown[i] = sd[p + "mlp.down_proj.weight"].t()
        m.norm_in[i] = sd[p + "input_layernorm.weight"]
        m.norm_post[i] = sd[p + "post_attention_layernorm.weight"]
        m.q_norm[i] = sd[p + "self_attn.q_norm.weight"]
        m.k_norm[i] = sd[p + "self_attn.k_norm.weight"]
    prompt = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, 8:].tolist()
        ref_logits = ref(prompt).logits[0, -1]
        pos = torch.zeros(1, dtype=torch.long)
        logits = m.step(prompt, pos)
        diff = (logits[0] - ref_logits).abs().max().item()
        got, token, p = [], logits.argmax(-1, keepdim=True), 8
        for _ in range(16):
            got.append(token.item())
            token = m.step(token, torch.tensor([p])).argmax(-1, keepdim=True)
            p += 1
    print(f"prefill logits max |diff| {diff:.2e}; greedy tokens {'equal' if got == want else 'DIFFER'}")
    assert diff < 1e-4, diff
    assert got == want, (got, want)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a Hugging Face config.json (Qwen3)")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--check", action="store_true", help="compare the step with transformers on the CPU and exit")
    a = p.parse_args()
    if a.check:
        check()
        return
    if not a.config or not a.out:
        p.error("--config and --out are required (or --check)")
    cfg = json.load(open(a.config))
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        with torch.no_grad():
            row = bench(cfg, b, a.prompt_len, a.new_tokens, torch.bfloat16, "cuda", a.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    result = {
        "what": "PyTorch Qwen3 decode, static KV cache, whole step in one CUDA graph, random bf16 weights",
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    json.dump(result, open(a.out, "w"), indent=2)


if __name__ == "__main__":
    sys.exit(main())
