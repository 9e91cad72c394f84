//! Element conversion between checkpoint dtypes and graph dtypes, streamed in chunks so that
//! converting a tensor never holds more than a bounded buffer (plus the mmap it reads from).

use half::{bf16, f16};
use pio_models::manifest::TensorDtype;
use safetensors::Dtype;

use crate::checkpoint::TensorRef;
use crate::error::{BuildError, BuildResult as Result};
use crate::onnx::graph::WeightSink;

/// Elements converted per chunk.
const CHUNK: usize = 1 << 20;

/// Reads element `i` of a little-endian F32/F16/BF16 buffer as f32.
#[inline]
fn read_f32(dtype: Dtype, data: &[u8], i: usize) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes([data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]]),
        Dtype::F16 => f16::from_le_bytes([data[2 * i], data[2 * i + 1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([data[2 * i], data[2 * i + 1]]).to_f32(),
        _ => f32::NAN,
    }
}

/// Appends `x` to `out` in `dtype` (floating types only).
#[inline]
pub fn push_f32(dtype: TensorDtype, x: f32, out: &mut Vec<u8>) {
    match dtype {
        TensorDtype::Float32 => out.extend_from_slice(&x.to_le_bytes()),
        TensorDtype::Float16 => out.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
        TensorDtype::Bfloat16 => out.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
        _ => unreachable!("push_f32 is only called with floating dtypes (checked by callers)"),
    }
}

/// Stores `x` as element `idx` of `out` in `dtype` (floating types only).
#[inline]
fn put_f32(dtype: TensorDtype, x: f32, out: &mut [u8], idx: usize) {
    match dtype {
        TensorDtype::Float32 => out[4 * idx..4 * idx + 4].copy_from_slice(&x.to_le_bytes()),
        TensorDtype::Float16 => out[2 * idx..2 * idx + 2].copy_from_slice(&f16::from_f32(x).to_le_bytes()),
        TensorDtype::Bfloat16 => out[2 * idx..2 * idx + 2].copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
        _ => unreachable!("put_f32 is only called with floating dtypes (checked by callers)"),
    }
}

pub fn is_float(dtype: TensorDtype) -> bool {
    matches!(dtype, TensorDtype::Float32 | TensorDtype::Float16 | TensorDtype::Bfloat16)
}

fn same_type(src: Dtype, dst: TensorDtype) -> bool {
    matches!(
        (src, dst),
        (Dtype::F32, TensorDtype::Float32) | (Dtype::F16, TensorDtype::Float16) | (Dtype::BF16, TensorDtype::Bfloat16)
    )
}

/// Element `index` of `t` read as f32, refused when it is finite but `dst` is float16 and it is
/// past float16's range (the conversion would make it infinite and the graph compute inf/NaN).
#[inline]
fn element(t: &TensorRef, dst: TensorDtype, index: usize) -> Result<f32> {
    let x = read_f32(t.dtype, t.data, index);
    if dst == TensorDtype::Float16 && x.is_finite() && x.abs() > f16::MAX.to_f32() {
        return Err(BuildError::Float16Overflow {
            tensor: t.name.to_string(),
            file: t.file.to_path_buf(),
            index,
            value: x,
        });
    }
    Ok(x)
}

/// Tensors are converted to the graph's floating dtype only; anything else is a caller's bug.
fn not_a_float(t: &TensorRef, dst: TensorDtype) -> BuildError {
    BuildError::Internal(format!("cannot convert tensor {} to {dst:?}", t.name))
}

/// Writes the tensor converted to `dst`, as stored (row-major).
pub fn write_converted(t: &TensorRef, dst: TensorDtype, sink: &mut WeightSink) -> Result<()> {
    if !is_float(dst) {
        return Err(not_a_float(t, dst));
    }
    if same_type(t.dtype, dst) {
        return sink.write(t.data);
    }
    let n: usize = t.shape.iter().product();
    let mut buf = Vec::with_capacity(CHUNK.min(n) * dst.size_bytes());
    let mut i = 0;
    while i < n {
        let end = (i + CHUNK).min(n);
        buf.clear();
        for j in i..end {
            push_f32(dst, element(t, dst, j)?, &mut buf);
        }
        sink.write(&buf)?;
        i = end;
    }
    Ok(())
}

/// Writes a 2-D tensor (rows, cols) transposed to (cols, rows), converted to `dst`.
/// Hugging Face linear weights are (out, in); ONNX MatMul wants (in, out).
pub fn write_transposed(t: &TensorRef, dst: TensorDtype, sink: &mut WeightSink) -> Result<()> {
    let [rows, cols] = t.shape[..] else {
        return Err(BuildError::Internal(format!(
            "tensor {} should be 2-D to transpose, has shape {:?}",
            t.name, t.shape
        )));
    };
    if !is_float(dst) {
        return Err(not_a_float(t, dst));
    }
    // Output rows (one per input column) are produced in blocks, reading the source in
    // cache-friendly tiles, so memory stays at one block however large the tensor is.
    let block = (CHUNK / rows.max(1)).clamp(1, cols.max(1));
    let mut buf = vec![0u8; block * rows * dst.size_bytes()];
    let mut c0 = 0;
    while c0 < cols {
        let c1 = (c0 + block).min(cols);
        // Source rows are read contiguously; the block buffer takes the scattered writes.
        for r in 0..rows {
            for c in c0..c1 {
                put_f32(dst, element(t, dst, r * cols + c)?, &mut buf, (c - c0) * rows + r);
            }
        }
        sink.write(&buf[..(c1 - c0) * rows * dst.size_bytes()])?;
        c0 = c1;
    }
    Ok(())
}

/// Reads a whole (small) tensor as f32: norms, biases, router weights.
pub fn to_f32_vec(t: &TensorRef) -> Vec<f32> {
    let n: usize = t.shape.iter().product();
    (0..n).map(|i| read_f32(t.dtype, t.data, i)).collect()
}
