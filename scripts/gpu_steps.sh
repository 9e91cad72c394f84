# Sourced by scripts/stages_gpu_check.sh and scripts/multi_gpu_bench.sh:
#
#   run_step NAME SECONDS CMD...   runs CMD (a command, or a function exported with export -f) under a
#                                  timeout of SECONDS, its output in $out/NAME.log, a JSON line in
#                                  $out/steps.jsonl; returns CMD's status (124: out of time).
#
# Reads $out (the results folder) and $step_tag (the prefix of the printed lines).
run_step() {
  local name=$1 t=$2; shift 2
  local s rc
  echo "[$step_tag] $name (up to ${t}s) ..."
  s=$(date +%s)
  # bash -c so that exported shell functions run under the timeout too.
  timeout --kill-after=10 "$t" bash -c '"$@"' _ "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "{\"step\":\"$name\",\"rc\":$rc,\"seconds\":$(( $(date +%s) - s )),\"timeout\":$t}" >> "$out/steps.jsonl"
  echo "[$step_tag] $name: rc=$rc in $(( $(date +%s) - s ))s"
  (( rc == 0 )) || tail -5 "$out/$name.log" | sed 's/^/    /'
  return $rc
}
