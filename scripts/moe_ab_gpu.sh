#!/usr/bin/env bash
# MoEInt4 of two builds in one call (Run 12): a baseline build carried as .gpu-b/pio-base.xz and
# .gpu-b/pio-kernels-check-base.xz (`gpu_session.sh setup` unpacks them to .gpu/*-base) against the current one.
# The ops harness on Qwen3-Coder-30B's expert shapes at 1/8/32 tokens, twice, alternating builds; pio bench of the
# 4-layer graphs (`PREP_QWEN3=0 PREP_MOE=1 MOE_PRESETS=qwen3-coder-30b MOE_KINDS="stock pio-moe"
# scripts/gpu_session.sh prep`) three times, alternating, with the stock graph twice; then greedy tokens of the
# current build's pio-moe graph against stock. AB_KIND=pio benches the every-family graph (MOE_KINDS with pio)
# instead of pio-moe; OPS_ROUNDS (2) and BENCH_ROUNDS (3) set the rounds. Everything goes to $OUT/ab-moe.tar.gz.
#
#   bash scripts/gpu_session.sh setup >/dev/null; bash scripts/moe_ab_gpu.sh
set -u
source .gpu-b/ort-env.sh
W=/dev/shm/pio-kernels-check
summary() {
  python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for preset, rows in d.items():
    for r in rows:
        if ' moe ' in r['case']:
            o = r['ours']
            print(sys.argv[2], r['case'], 'us %.1f' % o['us_per_op'],
                  {k: v for k, v in r.items() if 'reference' in k or k.startswith('max_rel')})
PY
}
for i in $(seq 1 "${OPS_ROUNDS:-2}"); do
  for v in base full; do
    s=-$v; [[ $v == full ]] && s=
    timeout ${OPS_SECONDS:-100} .gpu/pio-kernels-check$s ops --out $OUT/ops-$v-$i.json --presets qwen3-coder-30b \
      --tokens ${OPS_TOKENS:-1,8,32} --other-tokens 1 --pool-gib 2 > $OUT/ops-$v-$i.log 2>&1
    echo "ops $v $i rc=$?"
    summary $OUT/ops-$v-$i.json "$v $i"
  done
done
G=$W/qwen3-coder-30b-l4-int4
for i in $(seq 1 "${BENCH_ROUNDS:-3}"); do
  for v in base full; do
    s=-$v; [[ $v == full ]] && s=
    timeout 100 .gpu/pio$s bench --graphs $G-${AB_KIND:-pio-moe} --ep cuda --cuda-graph on --batches 1,8 \
      --prompt-lens 128 --decode-prompt-len 128 --decode-tokens 64 --repeats 3 --out $OUT/bench-$v-$i.json \
      > $OUT/bench-$v-$i.log 2>&1
    grep -E "int4" $OUT/bench-$v-$i.log | grep -v INFO | sed "s/^/$v $i /"
  done
  [[ $i != 2 ]] && timeout 100 .gpu/pio bench --graphs $G-stock --ep cuda --cuda-graph on --batches 1,8 \
      --prompt-lens 128 --decode-prompt-len 128 --decode-tokens 64 --repeats 3 --out $OUT/bench-stock-$i.json \
      2>&1 | grep -E "int4" | grep -v INFO | sed "s/^/stock $i /"
done
timeout 120 .gpu/pio-kernels-check greedy --stock $G-stock --pio $G-${AB_KIND:-pio-moe} --tokens 64 --out $OUT/greedy.json > $OUT/greedy.log 2>&1
echo "greedy rc=$?"
python3 -c "import json,sys; d=json.load(open(sys.argv[1]))['greedy']; print({k: v for k, v in d.items() if not isinstance(v, list)})" $OUT/greedy.json 2>&1 | cut -c1-400
cd $OUT && tar czf ab-moe.tar.gz ops-* bench-* greedy.* && rm -f ops-* bench-* greedy.*
