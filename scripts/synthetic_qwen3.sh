# Sourced by the GPU scripts (engine_gpu_check.sh, serve_gpu_bench.sh): the synthetic Qwen3-4B
# they run.
#
#   export_synthetic_qwen3 EP NAME LOG    exports it into $shm/NAME-TAG-PRECISION (reused when
#                                         there) and sets $graphs to that folder
#
# EP=cuda: bf16 at the real size, or LAYERS=N layers of it; EP=cpu: a tiny fp32 model (1 layer,
# hidden 64) for dry runs of the scripts. Reads $bin (the pio-export folder) and $shm.
export_synthetic_qwen3() {
  local ep=$1 name=$2 log_file=$3 shape=() tag=full precision=bf16
  if [[ $ep == cpu ]]; then
    shape=(--layers 1 --hidden-size 64 --intermediate-size 128 --heads 2 --kv-heads 1 --head-dim 32)
    tag=cpu-dry-run
    precision=fp32
  elif [[ -n ${LAYERS:-} ]]; then
    shape=(--layers "$LAYERS")
    tag=l$LAYERS
  fi
  graphs=$shm/$name-$tag-$precision
  if [[ -f $graphs/pio.json ]]; then
    echo "reusing the export in $graphs" >> "$log_file"
    return
  fi
  "$bin/pio-export" --model qwen3-4b-instruct-2507 --synthetic "${shape[@]}" \
    --checkpoint-out "$shm/qwen3-4b-synthetic-$tag" --ep "$ep" --precision $precision --out "$graphs" --force \
    >> "$log_file" 2>&1
}
