#!/usr/bin/env bash
# One GPU lease, in the calls it is made of: every figure of the issues' GPU sections that one H100/H200 can give,
# each call within the device tool's 10 minutes and its 8 returned files (each part tars its results).
#
#   scripts/gpu_session.sh torch     PyTorch baseline: Qwen3-4B decode, static cache, whole step in one CUDA graph
#   scripts/gpu_session.sh prep      the exports of `serve` and `vl` (pio-export needs no ONNX Runtime), in the first
#                                    call, which carries .gpu-a and .gpu-c (pio-export, the tokenizer)
#   scripts/gpu_session.sh setup     ONNX Runtime's CUDA build (from the two halves .gpu-a/ort.part00 and
#                                    .gpu-b/ort.part01, since the whole archive and the tree exceed one call's
#                                    64 MiB), the binaries (.gpu-b/*.xz into .gpu/) and the Qwen3 tokenizer
#   scripts/gpu_session.sh kernels   scripts/kernels_gpu_check.sh: read bandwidth, the kernels on every projection
#                                    shape, synthetic Qwen3-4B bf16/int4 stock vs --pio-kernels (pio bench at batch
#                                    1/8/32, greedy equality); keeps the checkpoint and graphs for the parts below
#   scripts/gpu_session.sh serve     pio bench serve on a synthetic Qwen3-4B bf16 (offline batch 32, streams at
#                                    concurrency 1/8/32/64, shared-prefix TTFT, ITL during a 4,096-token prefill,
#                                    Poisson arrivals), once per BUDGET:FACTOR in SERVE_CONFIGS (default
#                                    "512:0 256:0 512:3": --prefill-budget and --itl-factor; the first is the
#                                    engine's default); SERVE_GRAPHS serves another graph folder (e.g. prep's)
#   scripts/gpu_session.sh engine    scripts/engine_gpu_check.sh at 12 layers: batched vs alone, prefix hit vs cold
#   scripts/gpu_session.sh vl        scripts/vl_gpu_bench.sh full (Qwen3-VL-2B bf16 + its text twin + transformers)
#   scripts/gpu_session.sh ncu-vl    every GPU kernel's time (Nsight Compute) of one vl_bench run: one 1024x1024
#                                    image encoded and prefilled (after `prep`; CUDA graphs off); kernels.csv
#   scripts/gpu_session.sh vl-profile ONNX Runtime's profile of one Qwen3-VL request: each node's provider (CPU
#                                    fallbacks) and host time, per operator (after `prep`)
#   scripts/gpu_session.sh bench4    pio bench of Qwen3-4B bf16/int4, stock and --pio-kernels (and int4 --pio-kernels
#                                    --int4-lm-head; exported by `prep` with PREP_KERNELS=1), batch 1/8/32, CUDA graphs
#                                    on; the --pio-kernels graphs again with each BENCH_ONE_TOKEN kernel (batch 1); then
#                                    bf16 stock prefill alone at prompt lengths PREFILL_LENS (unset: 16 to 2,048; empty: none)
#   scripts/gpu_session.sh probe     pio-kernels-check probe: read bandwidth and every projection shape of the presets
#                                    through the tile kernels (1/8/32 tokens, warps per CTA swept), no model
#   scripts/gpu_session.sh probe-variants  pio-kernels-check builds of different kernel sources (VARIANTS/pkc-NAME.xz),
#                                    probed in turn ROUNDS times, and Nsight Compute on NCU_VARIANTS (no ONNX Runtime)
#   scripts/gpu_session.sh moe-check greedy tokens and logits of the stock int4 MoE graphs (QMoE) against --pio-kernels
#                                    (MoEInt4) and pio bench of every MOE_KINDS graph: Qwen3-Coder-30B and GLM-4.7 cut
#                                    to MOE_LAYERS layers (exported by `prep` with PREP_MOE=1)
#   scripts/gpu_session.sh nsys-genai Nsight Systems kernel summaries of pio's and onnxruntime-genai's Qwen3-4B bf16
#                                    batch-1 step, and the decode with a 512-token against an 8,192-token KV buffer
#   scripts/gpu_session.sh nsys-vl   Nsight Systems over vl_bench's time to first token (1024x1024 image; `prep`'s
#                                    Qwen3-VL graphs, VL_PRECISION): kernels, CUDA API calls, GPU and API traces
#   scripts/gpu_session.sh ncu-tiles Nsight Compute's full set on one int4 tile-kernel launch per Qwen3-4B projection at
#                                    one token (why a few-MB projection takes microseconds more than its bytes need)
#   scripts/gpu_session.sh ops-moe   pio-kernels-check ops on the MoE presets: our int4 MoE kernel (MoEInt4) against
#                                    ONNX Runtime's QMoE inside ONNX Runtime, every MoE layer shape at 1/8/32 tokens
#   scripts/gpu_session.sh attention pio-kernels-check attention: the one-token decode-attention kernel against its
#                                    CPU reference (batch sizes, lengths, query groups, a window) and timed (no ONNX
#                                    Runtime: runs in the first call)
#   scripts/gpu_session.sh attn-ab   pio bench of Qwen3-4B bf16/int4 stock, --pio-kernels (all) and --pio-kernels
#                                    all,attention (prep's KERNEL_KINDS="stock pio pio-attn"), batch 1/8/32 (AB_BATCHES),
#                                    then greedy 64 tokens of the pio-attn graphs against stock after 32- and 300-token
#                                    prompts (GREEDY_PROMPTS)
#   scripts/gpu_session.sh score     pio perplexity (prompt logprobs through the engine) on SCORE_WINDOWS windows of 512
#                                    random tokens, timed, on prep's q4b-bf16-stock (one token per run) and
#                                    q4b-bf16-all-logits (scored inside the prefill; KERNEL_KINDS="stock all-logits")
#   scripts/gpu_session.sh genai     onnxruntime-genai 0.18 built from the synthetic Qwen3-4B checkpoint of `kernels`
#                                    or `prep` (bf16, int4; batch 1 and 32; .gpu-genai holds its wheels; needs only
#                                    ONNX Runtime unpacked by an earlier call of the lease, no binaries)
#
# Results go to $OUT (one tar.gz per part plus its summary JSON). The engine and vl parts stop after PART_SECONDS
# (default 540) and still pack what they wrote. Between calls the device removes every ignored
# folder of the tree that the next call does not carry (.gpu-a, .gpu-b, .gpu), but keeps /dev/shm and /opt while it
# stays warm: so the first call (carrying .gpu-a) stashes its half of ONNX Runtime in /dev/shm/pio-gpu-a, and every
# later part (carrying .gpu-b) unpacks the binaries again if .gpu is gone (a few seconds). PIO_BINS names another
# carried folder with the binaries' .xz and ort-env.sh (no ort.part01) for a call that must leave room in its 64 MiB
# for something else (.gpu-genai): ONNX Runtime is then the one an earlier call of the lease unpacked in /opt. What ran on 2026-12-06:
# benches/results/2026-12-06-h100/README.md.
set -uo pipefail
part=${1:?usage: scripts/gpu_session.sh torch|prep|setup|kernels|serve|engine|vl|ncu-vl|ncu-tiles|vl-profile|bench4|probe|probe-variants|moe-check|nsys-genai|nsys-vl|ops-moe|genai|attention|attn-ab}
out=${OUT:?OUT must be set}
work=/dev/shm/pio-kernels-check
mkdir -p "$out"
export RUST_LOG=${RUST_LOG:-info,ort=warn} NO_COLOR=1 PYTHONUNBUFFERED=1
stash=/dev/shm/pio-gpu-a
bins=${PIO_BINS:-.gpu-b}
if [[ -d .gpu-a ]]; then mkdir -p "$stash" && cp -u .gpu-a/* "$stash/"; fi
# onnxruntime-genai's wheels, kept for a later call of the lease that cannot carry them (genai, nsys-genai).
if [[ -d .gpu-genai ]]; then mkdir -p /dev/shm/genai-wheels && cp -u .gpu-genai/* /dev/shm/genai-wheels/; fi
[[ -f $bins/ort-env.sh && -f /opt/pio-ort/libonnxruntime.so.1.31.1 ]] && source $bins/ort-env.sh

unpack_tokenizer() { # unpack_tokenizer DIR: the Qwen3 tokenizer a carried folder holds, into .cache/pio
  mkdir -p .cache/pio/tokenizers/qwen3
  xz -dc "$1/tokenizer.json.xz" > .cache/pio/tokenizers/qwen3/tokenizer.json
  cp "$1/tokenizer_config.json" .cache/pio/tokenizers/qwen3/
}

export_flags() { # export_flags KIND: pio-export's flags for a graph kind of `prep` (stock, pio, pio-lm4, pio-moe,
  # pio-attn: every family and attention, which `all` leaves out, attn: only attention, all-logits: stock with every
  # position's logits, for `score`)
  case $1 in
    all-logits) echo --all-logits ;;
    pio) echo --pio-kernels ;;
    pio-attn) echo --pio-kernels all,attention ;;
    attn) echo --pio-kernels attention ;;
    pio-lm4) echo --pio-kernels --int4-lm-head ;;
    pio-moe) echo --pio-kernels moe ;;
  esac
}

find_nsys() { # find_nsys: Nsight Systems' nsys on this host, or nothing
  command -v nsys || ls /opt/nvidia/nsight-systems/*/bin/nsys /usr/local/cuda/bin/nsys 2>/dev/null | head -n 1
}

decode_bench() { # decode_bench BIN NAME BATCHES LINES GRAPH_ARGS...: BIN's pio bench (prompt 128, 128 new tokens,
  # CUDA graphs) into $out/NAME.json and .log, its last LINES lines shown. TTFT is the median of TTFT_REPEATS (default
  # 5) prefills: one sample (Run 15's --repeats 1) spread 7.4 to 9.2 ms across rounds, too wide to compare with
  # onnxruntime-genai's median of three.
  local bin=$1 name=$2 batches=$3 lines=$4
  shift 4
  timeout ${PART_SECONDS:-240} "$bin" bench "$@" --ep cuda --cuda-graph on --batches "$batches" --prompt-lens 128 \
    --decode-prompt-len 128 --decode-tokens 128 --repeats ${TTFT_REPEATS:-5} --out "$out/$name.json" > "$out/$name.log" 2>&1
  echo "$name: pio bench rc=$?"
  grep -v "INFO\|WARN" "$out/$name.log" | tail -n "$lines"
}

pack() { # pack NAME DIR: DIR as $out/NAME.tar.gz
  tar -C "$(dirname "$2")" -czf "$out/$1.tar.gz" "$(basename "$2")" && rm -rf "$2"
}

# Parts that run our binaries unpack them again when an earlier call's .gpu was removed.
if [[ $part != torch && $part != setup && $part != prep && $part != genai && $part != probe-variants && $part != attention && ! -x .gpu/pio ]]; then
  bash "$0" setup >/dev/null || exit 1
  source $bins/ort-env.sh
fi

case $part in
  torch)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.csv"
    python3 scripts/torch_cudagraph_baseline.py --config "$stash/qwen3-4b-config.json" --batches 1,32 \
      --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/torch.json"
    ;;
  prep)
    # The first call of a lease (carrying .gpu-a and .gpu-c: pio-export and the tokenizer): while ONNX Runtime's
    # second half is still to come, export what later parts run (pio-export needs no ONNX Runtime): the synthetic
    # Qwen3-4B bf16 of `serve` into /dev/shm/pio and the Qwen3-VL-2B graphs of `vl` into /dev/shm/pio-vl.
    mkdir -p .gpu "$out/prep"
    xz -dc .gpu-c/pio-export.xz > .gpu/pio-export && chmod +x .gpu/pio-export
    unpack_tokenizer .gpu-c
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.csv"
    # PREP_QWEN3=0 skips the Qwen3-4B export (and with it PREP_KERNELS's graphs).
    [[ ${PREP_QWEN3:-1} == 1 ]] && (bin=.gpu shm=/dev/shm/pio && mkdir -p $shm && source scripts/synthetic_qwen3.sh \
      && export_synthetic_qwen3 cuda qwen3-4b-graphs "$out/prep/export-qwen3.log"; echo "qwen3 export rc=$?"
      # PREP_KERNELS=1: that checkpoint also as the `bench4` part's graphs (bf16/int4, stock/--pio-kernels, and int4
      # --pio-kernels with the lm_head in int4 too, as onnxruntime-genai's int4 graph has it; KERNEL_KINDS to choose).
      if [[ ${PREP_KERNELS:-0} == 1 ]]; then
        mkdir -p $work
        for p in bf16 int4; do
          for kind in ${KERNEL_KINDS:-stock pio pio-lm4}; do
            [[ $kind == pio-lm4 && $p != int4 ]] && continue
            .gpu/pio-export --checkpoint $shm/qwen3-4b-synthetic-full --ep cuda --precision $p --context-length 8192 \
              --force $(export_flags $kind) --out $work/q4b-$p-$kind >> "$out/prep/export-kernels.log" 2>&1 &
          done
        done
        wait; echo "kernel graphs: $(ls $work)"
      fi) &
    # PREP_MOE=1: the two MoE presets (MOE_PRESETS) cut to MOE_LAYERS layers (default 4) at their real width
    # (Qwen3-Coder-30B-A3B: every layer MoE; GLM-4.7: 3 dense layers first), int4, in MOE_KINDS (default "stock
    # pio"): stock (QMoE), pio (--pio-kernels, every family) and pio-moe (--pio-kernels moe: only the MoE op
    # differs from stock), for the `moe-check` part.
    if [[ ${PREP_MOE:-0} == 1 ]]; then
      (mkdir -p $work
       for preset in ${MOE_PRESETS:-qwen3-coder-30b glm-4-7}; do
         for layers in ${MOE_LAYERS:-4}; do
           ck=$work/$preset-l$layers-ck
           .gpu/pio-export --model $preset --synthetic --layers $layers --checkpoint-only --checkpoint-out $ck \
             >> "$out/prep/export-moe.log" 2>&1
           for kind in ${MOE_KINDS:-stock pio}; do
             .gpu/pio-export --checkpoint $ck --ep cuda --precision int4 --context-length 4096 --force \
               $(export_flags $kind) --out $work/$preset-l$layers-int4-$kind >> "$out/prep/export-moe.log" 2>&1 &
           done
           wait; rm -rf $ck
         done
       done
       echo "moe graphs: $(ls -d $work/*-int4-* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')") &
    fi
    [[ ${PREP_VL:-1} == 1 ]] && { OUT=$out/prep PIO_BIN_DIR=.gpu bash scripts/vl_gpu_bench.sh full export; echo "vl export rc=$?"; }
    wait
    ls /dev/shm/pio /dev/shm/pio-vl/graphs 2>/dev/null
    # The Qwen3-VL export's last steps, when it ran (PREP_VL=0: none; not a failure of the part).
    if [[ -f $out/prep/steps.log ]]; then tail -n 3 "$out/prep/steps.log"; fi
    ;;
  setup)
    if [[ ! -f /opt/pio-ort/libonnxruntime.so.1.31.1 ]]; then
      cat "$stash/ort.part00" $bins/ort.part01 > $bins/ort-cuda-sm90.tar.xz || exit 1
    fi
    source $bins/ort-env.sh
    mkdir -p .gpu .gpu/examples
    for f in $bins/*.xz; do
      name=$(basename "$f" .xz)
      [[ $name == tokenizer.json ]] && continue
      dest=.gpu/$name
      [[ $name == vl_bench ]] && dest=.gpu/examples/vl_bench
      xz -dc "$f" > "$dest" && chmod +x "$dest"
    done
    [[ -f $bins/tokenizer.json.xz ]] && unpack_tokenizer $bins
    ls -la .gpu .gpu/examples /opt/pio-ort | tee "$out/setup.txt"
    ;;
  attention)
    pkc=${PKC:-.gpu-e/pkc-H.xz}
    mkdir -p .gpu && xz -dc "$pkc" > .gpu/pio-kernels-check-attn && chmod +x .gpu/pio-kernels-check-attn
    timeout ${PART_SECONDS:-240} .gpu/pio-kernels-check-attn attention --out "$out/attention.json" > "$out/attention.log" 2>&1
    echo "attention check rc=$?"
    grep -v "INFO\|WARN" "$out/attention.log" | tail -n 24
    ;;
  attn-ab)
    graphs=()
    for p in bf16 int4; do for kind in stock pio pio-attn; do graphs+=(--graphs $work/q4b-$p-$kind); done; done
    decode_bench .gpu/pio attn-ab-${AB_ROUND:-1} ${AB_BATCHES:-1,8,32} 14 "${graphs[@]}"
    # XQA_AB=1: the stock bf16 graph with ONNX Runtime's XQA decode kernel forced on and off (ORT_ENABLE_XQA), batch 1.
    if [[ ${XQA_AB:-0} == 1 ]]; then
      for x in 1 0; do
        ORT_ENABLE_XQA=$x decode_bench .gpu/pio xqa-$x 1 2 --graphs $work/q4b-bf16-stock
      done
    fi
    for p in ${GREEDY_PRECISIONS:-bf16 int4}; do
      for prompt in ${GREEDY_PROMPTS:-32 300}; do
        timeout 120 .gpu/pio-kernels-check greedy --stock $work/q4b-$p-stock --pio $work/q4b-$p-pio-attn --tokens 64 \
          --prompt-tokens $prompt --out "$out/greedy-$p-p$prompt.json" > "$out/greedy-$p-p$prompt.log" 2>&1
        echo "greedy $p prompt $prompt rc=$?: $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); g=d.get('greedy',{}); t=d.get('teacher_forced',{}); print('equal', g.get('tokens_equal'), 'first', g.get('first_mismatch'), 'maxdiff', t.get('max_abs_logit_diff'), 'top1', t.get('top1_agreement'))" "$out/greedy-$p-p$prompt.json" 2>&1 | tail -c 400)"
      done
    done
    ;;
  kernels)
    k=$out/kernels
    OUT=$k PIO_CHECK_BUDGET=${PIO_CHECK_BUDGET:-320} PIO_CHECK_SKIP=${PIO_CHECK_SKIP:-ops,moe_model,greedy_int4} \
      PIO_CHECK_KEEP=1 PIO_CHECK_KEEP_CHECKPOINT=1 PIO_CHECK_WORK=$work bash scripts/kernels_gpu_check.sh
    cp "$k/summary.json" "$out/kernels-summary.json" 2>/dev/null
    pack kernels "$k"
    ;;
  serve)
    # The full synthetic Qwen3-4B bf16 (exported here, reused while the machine stays warm), then `pio bench serve`
    # once per BUDGET:FACTOR[:THRESHOLD] in SERVE_CONFIGS (--prefill-budget, --itl-factor, 0 is pacing off;
    # --long-prefill-token-threshold, 0 or absent is off: e.g. 512:0:128); runs after the
    # first skip the prefix section, run 32 streams only and sweep fewer rates (RATES_AFTER). Steps over 100 ms
    # are logged (debug).
    mkdir -p /dev/shm/pio "$out/serve"
    bin=.gpu shm=/dev/shm/pio
    source scripts/synthetic_qwen3.sh
    export_synthetic_qwen3 cuda qwen3-4b-graphs "$out/serve/export.log" || { tail "$out/serve/export.log"; exit 1; }
    g=${SERVE_GRAPHS:-$graphs}
    first=1
    for config in ${SERVE_CONFIGS:-512:0 256:0 512:3}; do
      IFS=: read -r budget f threshold <<< "$config"
      f=${f:-0} threshold=${threshold:-0}
      name=b$budget-f$f
      [[ $threshold != 0 ]] && name=$name-t$threshold
      # A setting repeated in SERVE_CONFIGS gets its own files (-2, -3, ...).
      n=1 base=$name
      while [[ -e $out/serve-bench-$name.json || -e $out/serve/serve-bench-$name.log ]]; do n=$((n + 1)) name=$base-$n; done
      if [[ $first == 1 ]]; then
        sections=${SERVE_SECTIONS:-offline,concurrency,sweep,prefix,long-prefill} rates=${RATES:-1,2,4,8,16,32,64}
        conc=${CONCURRENCY:-1,8,32,64}
        cap=${SERVE_SECONDS:-150}
      else
        sections=offline,concurrency,sweep,long-prefill rates=${RATES_AFTER:-4,16} conc=32 cap=${SERVE_SECONDS_AFTER:-90}
      fi
      first=0
      RUST_LOG=${SERVE_LOG:-info,ort=warn,pio_runtime::engine::worker=debug} .gpu/pio bench serve --graphs "$g" --ep cuda \
        --ep-option cuda_graph=1 --prefill-budget "$budget" --itl-factor "$f" \
        --long-prefill-token-threshold "$threshold" --max-seqs 64 --max-model-len 4352 --sections $sections \
        --concurrency $conc --prompt-len 128 --max-tokens 256 --offline-batch 32 --prefix-len 2048 \
        --prefix-suffix 64 --prefix-requests 5 --long-prompt 4096 --long-streams 31 --long-stream-tokens 256 \
        --rates $rates --sweep-duration ${SWEEP_SECONDS:-4} --sweep-prompt-lens 64..4096 \
        --sweep-max-tokens 128 --max-duration $cap --out "$out/serve-bench-$name.json" \
        > "$out/serve/serve-bench-$name.log" 2>&1
      echo "pio bench serve --prefill-budget $budget --itl-factor $f --long-prefill-token-threshold $threshold: rc=$?"
      grep -v "slow engine step\|DEBUG" "$out/serve/serve-bench-$name.log" | tail -n 16
      echo "steps over 100 ms: $(grep -c "slow engine step" "$out/serve/serve-bench-$name.log")"
      grep "slow engine step" "$out/serve/serve-bench-$name.log" | sed -n '1,3p;$p' | cut -c1-420
    done
    pack serve "$out/serve"
    ;;
  engine)
    OUT=$out/engine PIO_BIN_DIR=.gpu LAYERS=${LAYERS:-12} timeout ${PART_SECONDS:-540} bash scripts/engine_gpu_check.sh
    cp "$out/engine/engine-check.json" "$out/engine-check.json" 2>/dev/null
    pack engine "$out/engine"
    ;;
  vl)
    OUT=$out/vl PIO_BIN_DIR=.gpu timeout ${PART_SECONDS:-540} bash scripts/vl_gpu_bench.sh full ${VL_STAGES:-}
    cp "$out/vl/summary.json" "$out/vl-summary.json" 2>/dev/null
    pack vl "$out/vl"
    ;;
  ncu-vl)
    # Nsight Compute times every kernel (one metric, no clock control) of a vl_bench run reduced to one image: its
    # warm-up and measured requests (encode + prefill of 1,090 tokens + 2 decode steps each), then the TTFT pair.
    n=$out/ncu-vl
    mkdir -p "$n"
    vg=/dev/shm/pio-vl/graphs/vl-bf16 img=/dev/shm/pio-vl/images/1024x1024.jpg
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    timeout ${PART_SECONDS:-300} "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-units base \
      --log-file "$n/kernels.csv" .gpu/examples/vl_bench --graphs "$vg" --ep cuda --images "$img" --ttft-image "$img" \
      --question-tokens 64 --decode-tokens 2 --repeats 1 --out "$n/vl-bench.json" > "$n/vl-bench.log" 2> "$n/stderr.log"
    echo "ncu rc=$? kernels=$(grep -c gpu__time_duration "$n/kernels.csv")"
    tail -n 3 "$n/stderr.log"
    python3 scripts/ncu_summary.py "$n/kernels.csv" --top 20
    pack ncu-vl "$n"
    ;;
  vl-profile)
    # ONNX Runtime's profile of one vl_bench request (one 1024x1024 image, after `prep`): which provider ran each
    # node of the vision encoder and the decoder (a CPUExecutionProvider row is a fallback with copies around it).
    # ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO makes each attention node print the kernel it chose.
    p=$out/vl-profile
    img=/dev/shm/pio-vl/images/1024x1024.jpg
    for precision in ${VL_PRECISIONS:-bf16}; do
      vg=/dev/shm/pio-vl/graphs/vl-$precision
      [[ -f $vg/pio.json ]] || { echo "no $vg"; continue; }
      mkdir -p "$p/traces-$precision"
      ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO=1 PIO_ORT_PROFILE=$p/traces-$precision timeout ${PART_SECONDS:-120} \
        .gpu/examples/vl_bench --graphs "$vg" --ep cuda --images "$img" --ttft-image "$img" --question-tokens 64 \
        --decode-tokens 2 --repeats 1 --out "$p/vl-bench-$precision.json" > "$p/vl-bench-$precision.log" 2>&1
      echo "vl_bench $precision (profiled) rc=$?"
      grep -m 3 -i "MultiHeadAttention" "$p/vl-bench-$precision.log" | cut -c1-300
      python3 scripts/ort_profile_summary.py "$p"/traces-$precision/*.json --top 30 \
        --json "$p/summary-$precision.json" > "$p/summary-$precision.txt" 2>&1
      grep -A 32 -i vision "$p/summary-$precision.txt" | head -n 34
      rm -rf "$p/traces-$precision"
    done
    pack vl-profile "$p"
    ;;
  bench4)
    # pio bench of the four graphs `prep` exported with PREP_KERNELS=1: Qwen3-4B bf16 and int4, stock and
    # --pio-kernels, CUDA graphs on, batch 1/8/32 (as scripts/kernels_gpu_check.sh's bench step).
    # Then the bf16 stock graph's prefill alone over prompt lengths: a prefill run's fixed part and its cost per
    # token (what a chunk beside running streams costs).
    graphs=()
    for g in q4b-bf16-stock q4b-bf16-pio q4b-int4-stock q4b-int4-pio q4b-int4-pio-lm4; do
      [[ -f $work/$g/pio.json ]] && graphs+=(--graphs "$work/$g")
    done
    decode_bench .gpu/pio bench4 ${BATCHES:-1,8,32} 30 "${graphs[@]}"
    pio_graphs=()
    for g in q4b-bf16-pio q4b-int4-pio; do [[ -f $work/$g/pio.json ]] && pio_graphs+=(--graphs "$work/$g"); done
    if [[ ${#pio_graphs[@]} -gt 0 ]]; then
      # The same --pio-kernels graphs at batch 1 with every format's one-token projections on one kernel, once per
      # PIO_ONE_TOKEN_KERNEL value in BENCH_ONE_TOKEN (default "tiles gemv": each format on the kernel it does not
      # take by default, int4 on the GEMV and 16-bit on the tiles; all variants: "tiles gemv gemv:wide gemv:pairs";
      # empty: none).
      for kernel in ${BENCH_ONE_TOKEN-tiles gemv}; do
        PIO_ONE_TOKEN_KERNEL=$kernel decode_bench .gpu/pio "bench4-${kernel//:/-}" 1 8 "${pio_graphs[@]}"
      done
      # A baseline build carried as .gpu-b/pio-base.xz (BASE: which commit): its kernels on the same graphs, in the
      # same call (the graph format is the same; only the kernels' code differs).
      if [[ -x .gpu/pio-base ]]; then
        echo "base build: ${BASE:-?}"
        decode_bench .gpu/pio-base bench4-base ${BATCHES:-1,8,32} 12 "${pio_graphs[@]}"
      fi
    fi
    if [[ -f $work/q4b-bf16-stock/pio.json && -n ${PREFILL_LENS-16,64,128,256,512,1024,2048} ]]; then
      timeout 120 .gpu/pio bench --graphs $work/q4b-bf16-stock --ep cuda --cuda-graph on --batches 1 \
        --prompt-lens ${PREFILL_LENS-16,64,128,256,512,1024,2048} --decode-tokens 1 --repeats 3 \
        --out "$out/prefill-curve.json" > "$out/prefill-curve.log" 2>&1
      echo "prefill curve rc=$?"
      grep -v "INFO\|WARN" "$out/prefill-curve.log" | tail -n 12
    fi
    ;;
  probe)
    # The kernels alone (no model): read bandwidth, exact int4 dequantization, every projection shape of the four
    # presets through the tile kernels at 1/8/32 tokens with warps per CTA swept (pio-kernels-check probe).
    mkdir -p "$out/probe"
    timeout ${PART_SECONDS:-150} .gpu/pio-kernels-check probe --out "$out/probe.json" --tokens ${PROBE_TOKENS:-1,8,32} \
      --presets ${PROBE_PRESETS:-all} > "$out/probe/probe.log" 2>&1
    echo "probe rc=$?"
    # The baseline build's kernels (.gpu-b/pio-kernels-check-base.xz) on Qwen3-4B's shapes, in the same call.
    if [[ -x .gpu/pio-kernels-check-base ]]; then
      timeout 90 .gpu/pio-kernels-check-base probe --out "$out/probe/probe-base.json" --tokens ${PROBE_BASE_TOKENS:-1,8} \
        --presets qwen3-4b-instruct-2507 > "$out/probe/probe-base.log" 2>&1
      echo "probe (base build ${BASE:-?}) rc=$?"
    fi
    tail -n 40 "$out/probe/probe.log"
    pack probe "$out/probe"
    ;;
  moe-check)
    # The MoE presets of `prep` with PREP_MOE=1: greedy tokens and teacher-forced logits of the stock int4 graph
    # (QMoE) against the --pio-kernels one (MoEInt4, which matches the CPU reference), then both under pio bench.
    # With MOE_LAYERS of two depths, the difference of their steps over the difference of their layers is one
    # layer's time, free of the lm_head and embedding (what a 48-layer model adds per layer).
    m=$out/moe-check
    mkdir -p "$m"
    for preset in ${MOE_PRESETS:-qwen3-coder-30b glm-4-7}; do
      for layers in ${MOE_LAYERS:-4}; do
        g=$work/$preset-l$layers-int4
        [[ -f $g-stock/pio.json ]] || { echo "no $g-stock"; continue; }
        if [[ -f $g-pio/pio.json && ${MOE_GREEDY:-1} == 1 ]]; then
          timeout 120 .gpu/pio-kernels-check greedy --stock $g-stock --pio $g-pio --tokens 64 \
            --out "$m/greedy-$preset-l$layers.json" > "$m/greedy-$preset-l$layers.log" 2>&1
          echo "greedy $preset l$layers rc=$?"
          python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['greedy']; print({k: v for k, v in d.items() if not isinstance(v, list)})" \
            "$m/greedy-$preset-l$layers.json" 2>&1 | cut -c1-400
        fi
        graphs=()
        for kind in ${MOE_KINDS:-stock pio}; do [[ -f $g-$kind/pio.json ]] && graphs+=(--graphs $g-$kind); done
        timeout 200 .gpu/pio bench "${graphs[@]}" --ep cuda --cuda-graph on --batches ${MOE_BATCHES:-1,8} \
          --prompt-lens 128 --decode-prompt-len 128 --decode-tokens 64 --repeats ${MOE_REPEATS:-3} \
          --out "$m/bench-$preset-l$layers.json" > "$m/bench-$preset-l$layers.log" 2>&1
        echo "bench $preset l$layers rc=$?"
        grep -v "INFO\|WARN\|CUDA graph replay" "$m/bench-$preset-l$layers.log" | tail -n 5
      done
    done
    pack moe-check "$m"
    ;;
  nsys-genai)
    # Where onnxruntime-genai's batch-1 step is shorter than ours (Run 7: bf16 268.3 against 261.8 tokens/s): Nsight
    # Systems' kernel summary of pio bench (Qwen3-4B bf16 of `prep`, batch 1, CUDA graphs, graph nodes traced) and of
    # genai's own bf16 graph of the same checkpoint generating 128 tokens; and the same graph exported with a
    # 512-token context, to see whether the KV buffer's length costs anything per step. Needs the genai wheels in
    # /dev/shm/genai-wheels (every call carrying .gpu-genai copies them there) and ONNX Runtime in /opt/pio-ort.
    n=$out/nsys-genai
    mkdir -p "$n"
    nsys=$(find_nsys)
    g=/dev/shm/pio/qwen3-4b-graphs-full-bf16 ck=/dev/shm/pio/qwen3-4b-synthetic-full
    .gpu/pio-export --checkpoint $ck --ep cuda --precision bf16 --context-length 512 --force --out /dev/shm/q4b-bf16-ctx512 \
      > "$n/export512.log" 2>&1 &
    source scripts/genai_setup.sh /dev/shm/genai-wheels /tmp/genai-env > "$n/genai-setup.log" 2>&1 || { echo "genai setup failed"; }
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout 150 python3 -m onnxruntime_genai.models.builder -i $ck -o /tmp/genai-bf16 \
      -p bf16 -e cuda -c /tmp/genai-hf > "$n/genai-build.log" 2>&1
    echo "genai build rc=$?"
    wait
    cat > /tmp/genai_decode.py <<'PY'
import sys, time, numpy as np, onnxruntime_genai as og
cfg = og.Config(sys.argv[1]); cfg.clear_providers(); cfg.append_provider("cuda"); model = og.Model(cfg)
ids = np.random.default_rng(0).integers(0, 151000, size=(1, 128), dtype=np.int32)
for n in (8, 128):
    p = og.GeneratorParams(model); p.set_search_options(max_length=128 + n, min_length=128 + n, do_sample=False, batch_size=1)
    gen = og.Generator(model, p); gen.append_tokens(ids); gen.generate_next_token(); t = time.perf_counter(); steps = 0
    while not gen.is_done():
        gen.generate_next_token(); steps += 1
    print(n, "tokens/s", steps / (time.perf_counter() - t))
PY
    if [[ -n $nsys ]]; then
      timeout 120 "$nsys" profile --cuda-graph-trace=node -t cuda -o /tmp/pio-b1 --force-overwrite true .gpu/pio bench \
        --graphs $g --ep cuda --cuda-graph on --batches 1 --prompt-lens 128 --decode-tokens 64 --repeats 1 --out /tmp/b.json \
        > "$n/pio.log" 2>&1
      "$nsys" stats -r cuda_gpu_kern_sum --format csv -o "$n/pio" /tmp/pio-b1.nsys-rep > /dev/null 2>&1
      timeout 120 "$nsys" profile --cuda-graph-trace=node -t cuda -o /tmp/genai-b1 --force-overwrite true \
        python3 /tmp/genai_decode.py /tmp/genai-bf16 > "$n/genai.log" 2>&1
      "$nsys" stats -r cuda_gpu_kern_sum --format csv -o "$n/genai" /tmp/genai-b1.nsys-rep > /dev/null 2>&1
      for who in pio genai; do
        "$nsys" stats -r cuda_api_sum --format csv -o "$n/$who" /tmp/$who-b1.nsys-rep > /dev/null 2>&1
      done
      for f in "$n"/*.csv; do echo "== $f"; head -n 16 "$f" | cut -c1-200; done
    else
      echo "no nsys on this host"
    fi
    timeout 120 .gpu/pio bench --graphs $g --graphs /dev/shm/q4b-bf16-ctx512 --ep cuda --cuda-graph on --batches 1,8 \
      --prompt-lens 128 --decode-tokens 128 --repeats 1 --out "$n/context-length.json" > "$n/context-length.log" 2>&1
    grep -v "INFO\|WARN" "$n/context-length.log" | tail -n 6
    pack nsys-genai "$n"
    ;;
  nsys-vl)
    # Where Qwen3-VL's time to first token goes (Run 7, int4: 41.4 ms, of which decode 6.1, preprocess 1.1, encode
    # 21.0, prefill about 13): Nsight Systems over vl_bench with the 1024x1024 image only (the graphs of `prep`,
    # VL_PRECISION, default int4): GPU kernels by name, CUDA API calls (a long cudaStreamSynchronize, cudaMemcpy or
    # cudaMalloc is the host waiting), and the GPU trace with timestamps (idle gaps between kernels are host time).
    n=$out/nsys-vl
    mkdir -p "$n"
    nsys=$(find_nsys)
    vg=/dev/shm/pio-vl/graphs/vl-${VL_PRECISION:-int4} img=/dev/shm/pio-vl/images/1024x1024.jpg
    [[ -n $nsys && -f $vg/pio.json ]] || { echo "no nsys ($nsys) or no $vg"; exit 1; }
    timeout ${PART_SECONDS:-150} "$nsys" profile -t cuda --cuda-graph-trace=node -o /tmp/vl-ttft --force-overwrite true \
      .gpu/examples/vl_bench --graphs "$vg" --ep cuda --ep-option cuda_graph=1 --images "$img" --ttft-image "$img" \
      --question-tokens 64 --decode-tokens 2 --repeats 3 --out "$n/vl-bench.json" > "$n/vl-bench.log" 2>&1
    echo "nsys vl rc=$?"
    for report in cuda_gpu_kern_sum cuda_api_sum cuda_gpu_trace cuda_api_trace; do
      "$nsys" stats -r $report --format csv -o "$n/vl" /tmp/vl-ttft.nsys-rep > /dev/null 2>&1
    done
    for f in "$n"/vl_cuda_gpu_kern_sum.csv "$n"/vl_cuda_api_sum.csv; do echo "== $f"; head -n 14 "$f" | cut -c1-160; done
    pack nsys-vl "$n"
    ;;
  ncu-tiles)
    # Nsight Compute's full set on one launch of the int4 tile kernel per Qwen3-4B projection at one token (the
    # default warps, a launch inside the probe's timing graph, weights past the L2): why a projection of a few MB
    # takes several microseconds more than its bytes need (Run 6's probe). Details (speed of light, memory, occupancy,
    # warp stall reasons) as text per projection, NCU_PROJECTIONS / NCU_FORMATS to change the cases.
    n=$out/ncu-tiles
    mkdir -p "$n"
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    [[ -n $ncu ]] || { echo "no ncu on this host"; exit 1; }
    for fmt in ${NCU_FORMATS:-int4}; do
      kernel=pio_linear_int4
      [[ $fmt == dense ]] && kernel=pio_linear_dense
      for proj in ${NCU_PROJECTIONS:-qkv o gate_up down}; do
        timeout 120 "$ncu" --set full -k regex:$kernel --launch-skip 1 --launch-count 1 -f -o "$n/$fmt-$proj" \
          .gpu/pio-kernels-check probe --out "$n/probe-$fmt-$proj.json" --presets qwen3-4b-instruct-2507 --tokens 1 \
          --projections $proj --formats $fmt --default-warps > "$n/$fmt-$proj.log" 2>&1
        echo "ncu $fmt $proj rc=$?"
        "$ncu" --import "$n/$fmt-$proj.ncu-rep" --page details --print-units base > "$n/$fmt-$proj-details.txt" 2>&1
        grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Stall|Warp Cycles Per Issued" \
          "$n/$fmt-$proj-details.txt" | head -n 12
      done
    done
    pack ncu-tiles "$n"
    ;;
  probe-variants)
    # Builds of different kernel sources side by side, no model and no ONNX Runtime: each pkc-NAME.xz in VARIANTS
    # (default .gpu-v; pio-kernels-check built from one kernel source, NAME its label, A the baseline by convention)
    # and each NAME.cu there (a kernel source run through the build SOURCE_BUILD with PIO_KERNEL_SOURCE)
    # probes PROBE_PRESETS' shapes at PROBE_TOKENS, ROUNDS times in turn (one lease's runs spread by a few percent),
    # then Nsight Compute's details of one launch of each NCU_VARIANTS build's int4 kernel at one token per
    # NCU_PROJECTIONS. summary.txt (scripts/probe_variants_summary.py): each case's median microseconds per build.
    v=$out/probe-variants
    mkdir -p "$v" .gpu
    for f in ${VARIANTS:-.gpu-v}/pkc-*.xz; do
      n=$(basename "$f" .xz)
      xz -dc "$f" > ".gpu/$n" && chmod +x ".gpu/$n"
    done
    # Sources: each NAME.cu in VARIANTS runs through the build SOURCE_BUILD (PIO_KERNEL_SOURCE replaces its source).
    variants=()
    for b in .gpu/pkc-*; do variants+=("${b#.gpu/pkc-}"); done
    for f in "${VARIANTS:-.gpu-v}"/*.cu; do [[ -f $f ]] && variants+=("$(basename "$f" .cu)"); done
    for r in $(seq 1 "${ROUNDS:-3}"); do
      for n in "${variants[@]}"; do
        bin=.gpu/pkc-$n src=
        [[ -x $bin ]] || { bin=.gpu/pkc-${SOURCE_BUILD:-E}; src=$(realpath "${VARIANTS:-.gpu-v}/$n.cu"); }
        PIO_KERNEL_SOURCE=$src timeout 120 "$bin" probe --kernels-only --out "$v/$n-$r.json" \
          --tokens "${PROBE_TOKENS:-1,8,32}" --presets "${PROBE_PRESETS:-qwen3-4b-instruct-2507}" > "$v/$n-$r.log" 2>&1
        echo "probe $n round $r rc=$?"
      done
    done
    python3 scripts/probe_variants_summary.py "$v" > "$v/summary.txt" 2>&1
    cat "$v/summary.txt"
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    for n in ${NCU_VARIANTS:-}; do
      [[ -n $ncu ]] || { echo "no ncu on this host"; break; }
      for proj in ${NCU_PROJECTIONS:-o down}; do
        timeout 120 "$ncu" --set full -k regex:pio_linear_int4 --launch-skip 1 --launch-count 1 -f -o "$v/ncu-$n-$proj" \
          ".gpu/pkc-$n" probe --kernels-only --out "$v/ncu-probe-$n-$proj.json" --presets qwen3-4b-instruct-2507 \
          --tokens 1 --projections "$proj" --formats int4 --default-warps > "$v/ncu-$n-$proj.log" 2>&1
        echo "ncu $n $proj rc=$?"
        "$ncu" --import "$v/ncu-$n-$proj.ncu-rep" --page details --print-units base > "$v/ncu-$n-$proj.txt" 2>&1
        grep -E "Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Warp Cycles Per Issued" \
          "$v/ncu-$n-$proj.txt" | head -n 8
      done
    done
    pack probe-variants "$v"
    ;;
  ops-moe)
    mkdir -p "$out/ops-moe"
    timeout ${PART_SECONDS:-200} .gpu/pio-kernels-check ops --out "$out/ops-moe.json" \
      --presets ${OPS_PRESETS:-qwen3-coder-30b,glm-4-7} --tokens ${OPS_TOKENS:-1,8,32} --other-tokens 1 \
      > "$out/ops-moe/ops.log" 2>&1
    echo "ops rc=$?"
    grep -i "moe\|qmoe" "$out/ops-moe/ops.log" | tail -n 20
    pack ops-moe "$out/ops-moe"
    ;;
  score)
    source $bins/ort-env.sh
    ids=$(python3 -c "import random; random.seed(7); print(','.join(str(random.randrange(151643)) for _ in range(${SCORE_WINDOWS:-16} * 512)))")
    for kind in all-logits stock; do
      g=$work/q4b-bf16-$kind
      [[ -d $g ]] || { echo "no $g"; continue; }
      start=$(date +%s.%N)
      timeout ${PART_SECONDS:-240} .gpu/pio perplexity --graphs $g --ep cuda --ids "$ids" --ctx 512 --json \
        > "$out/score-$kind.json" 2> "$out/score-$kind.log"
      rc=$?
      echo "$kind: rc=$rc, $(python3 -c "print(f'{$(date +%s.%N) - $start:.1f} s')") for ${SCORE_WINDOWS:-16} windows of 512"
      tail -n 3 "$out/score-$kind.log"
    done
    ;;
  genai)
    # The checkpoint of `kernels` (its folder) or of `prep` (export_synthetic_qwen3's, which pio-export wrote with the
    # Qwen3 tokenizer in it).
    ck=$work/qwen3-4b-ck
    [[ -f $ck/config.json ]] || ck=/dev/shm/pio/qwen3-4b-synthetic-full
    [[ -f /opt/pio-ort/libonnxruntime.so.1.31.1 ]] || { echo "ONNX Runtime is not unpacked in /opt/pio-ort"; exit 1; }
    cp .cache/pio/tokenizers/qwen3/tokenizer.json .cache/pio/tokenizers/qwen3/tokenizer_config.json "$ck/" 2>/dev/null
    source scripts/genai_setup.sh /dev/shm/genai-wheels /tmp/genai-env || exit 1
    set +e
    python3 scripts/genai_baseline.py --checkpoint "$ck" --work /tmp/genai-work --precisions ${GENAI_PRECISIONS:-bf16,int4} \
      --batches 1,32 --prompt-len 128 --new-tokens 128 --repeats 3 --out "$out/genai.json" 2>&1 \
      | grep -v -E "Saving|quantiz|it/s" | tail -n 30
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
