#!/usr/bin/env bash
# Makes onnxruntime-genai-cuda importable on the GPU host, running on the ONNX Runtime build that pio uses.
#
#   source scripts/genai_setup.sh WHEEL_DIR [WORK_DIR]
#
# WHEEL_DIR holds onnxruntime_genai_cuda-*.whl (PyPI, cp312 manylinux_2_28), and may hold onnx_ir-*.whl and
# ml_dtypes-*.whl for a python that lacks them (the genai builder imports onnx_ir). The genai wheel depends on
# onnxruntime-gpu, too big to carry; it loads the first capi/libonnxruntime.so* of the `onnxruntime` package it
# imports. So: the wheels are installed with --no-deps into WORK_DIR/site, the python's own `onnxruntime` package
# (a CPU build, whose Python code the builder's int4 quantizer uses) is copied to WORK_DIR/ortpy with its
# libonnxruntime replaced by ONNX Runtime 1.31.1's CUDA build from /opt/pio-ort (unpacked by .gpu/ort-env.sh), and
# both go first on PYTHONPATH.
set -eo pipefail
wheels=${1:?usage: source scripts/genai_setup.sh WHEEL_DIR [WORK_DIR]}
work=${2:-/tmp/genai-env}
ort_libs=${PIO_ORT_DIR:-/opt/pio-ort}
mkdir -p "$work/site" "$work/ortpy"
python3 -m pip install -q --no-deps --no-index --target "$work/site" "$wheels"/onnxruntime_genai_cuda-*.whl
for pkg in onnx_ir ml_dtypes; do
  if ! python3 -c "import $pkg" 2>/dev/null && compgen -G "$wheels/$pkg-*.whl" > /dev/null; then
    python3 -m pip install -q --no-deps --no-index --target "$work/site" "$wheels"/$pkg-*.whl
  fi
done
ort_py=$(python3 -c "import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__))")
rm -rf "$work/ortpy/onnxruntime"
cp -r "$ort_py" "$work/ortpy/onnxruntime"
rm -f "$work/ortpy/onnxruntime/capi/"libonnxruntime.so*
cp "$ort_libs"/*.so* "$work/ortpy/onnxruntime/capi/"
export PYTHONPATH="$work/site:$work/ortpy${PYTHONPATH:+:$PYTHONPATH}"
# libonnxruntime-genai-cuda.so (dlopened when a model asks for the cuda provider) needs these CUDA 13 libraries;
# where the loader finds one not, /usr/local/cuda/lib64 and then the pip nvidia packages beside torch
# (site-packages/nvidia/cu13/lib) are appended to LD_LIBRARY_PATH, until it finds them all.
genai_missing_cuda_libs() {
  python3 -c 'import ctypes, sys
for n in sys.argv[1:]:
    try: ctypes.CDLL(n)
    except OSError: print(n)' libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcufft.so.12
}
nv_lib=$(python3 -c "import importlib.util as u; s = u.find_spec('nvidia'); print(list(s.submodule_search_locations)[0] + '/cu13/lib' if s else '')" 2>/dev/null || true)
for d in /usr/local/cuda/lib64 $nv_lib; do
  [[ -z $(genai_missing_cuda_libs) ]] && break
  [[ -d $d ]] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$d"
done
missing=$(genai_missing_cuda_libs)
[[ -z $missing ]] || echo "genai_setup: not found by the loader (the cuda provider will fail to load): $missing" >&2
# The builder's imports (onnx_ir needs onnx; the int4 quantizer is the onnxruntime Python package's).
python3 -c "import torch, transformers, onnx, onnx_ir, onnxruntime.quantization.matmul_nbits_quantizer" ||
  { echo "genai_setup: the builder's Python packages are not all importable" >&2; return 1 2>/dev/null || exit 1; }
python3 -c "import onnxruntime_genai as og; print('onnxruntime-genai', og.__version__)"
