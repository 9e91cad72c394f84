//! Checkpoint tensors written as graph initializers, shared by every graph builder (the decoder
//! and the vision encoder): weights converted to the graph dtype, projections as a MatMul on the
//! transposed weight (or MatMulNBits on the stored one), biases.

use indicatif::ProgressBar;
use pio_models::manifest::TensorDtype;

use crate::checkpoint::Checkpoint;
use crate::convert::{push_f32, to_f32_vec, write_converted, write_transposed};
use crate::error::BuildResult as Result;
use crate::onnx::graph::Graph;
use crate::settings::ExportSettings;

/// Where a graph's weights come from and how they are stored.
#[derive(Clone, Copy)]
pub struct WeightSource<'a> {
    pub ck: &'a Checkpoint,
    /// The dtype of the graph's weights and activations.
    pub dtype: TensorDtype,
    pub settings: &'a ExportSettings,
    pub progress: &'a ProgressBar,
}

impl WeightSource<'_> {
    /// Counts checkpoint bytes consumed, for the progress bar.
    pub fn advance(&self, bytes: usize) {
        self.progress.inc(bytes as u64);
    }

    /// A weight stored as in the checkpoint (norms, embeddings, biases), converted to the graph dtype.
    pub fn weight(&self, g: &mut Graph, hf_name: &str, shape: &[usize]) -> Result<String> {
        let t = self.ck.tensor(hf_name, shape)?;
        let dtype = self.dtype;
        let n = t.data.len();
        let name = g.initializer_with(hf_name, dtype, shape, |sink| write_converted(&t, dtype, sink))?;
        self.ck.release(hf_name);
        self.advance(n);
        Ok(name)
    }

    /// y = x @ W^T over one or more projections of the same input (`hf_prefixes`, their output
    /// features concatenated in order: q|k|v, gate|up), plus their concatenated biases when
    /// `bias`. The weight is transposed at export so the graph runs a plain MatMul, or with
    /// `quantize` a MatMulNBits on the (out, in) weight itself.
    #[allow(clippy::too_many_arguments)]
    pub fn projection(
        &self,
        g: &mut Graph,
        pio_usage: Option<&mut crate::pio_ops::PioUsage>,
        x: &str,
        node_name: &str,
        hf_prefixes: &[String],
        in_dim: usize,
        out_dims: &[usize],
        bias: bool,
        quantize: bool,
    ) -> Result<String> {
        if let (true, Some(seed)) = (quantize, self.settings.random_int4) {
            // Drawn as int4 codes, never read (`--direct-int4`: the checkpoint does not hold it).
            let n = out_dims.iter().sum();
            let y = crate::random_int4::matmul_nbits(g, x, node_name, (n, in_dim), self.settings, seed)?;
            return self.with_bias(g, y, node_name, hf_prefixes, out_dims, bias);
        }
        let tensors = hf_prefixes
            .iter()
            .zip(out_dims)
            .map(|(p, &out)| self.ck.tensor(&format!("{p}.weight"), &[out, in_dim]))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let read: usize = tensors.iter().map(|t| t.data.len()).sum();
        let total_out: usize = out_dims.iter().sum();
        let dtype = self.dtype;
        // `--pio-kernels`: Inference-PIO's own operator where it applies (decoder graphs only).
        let pio = match pio_usage {
            Some(usage) => crate::pio_ops::projection(
                g,
                self.settings,
                usage,
                x,
                node_name,
                &tensors,
                (in_dim, total_out),
                quantize,
            )?,
            None => None,
        };
        let y = if let Some(y) = pio {
            y
        } else if quantize {
            crate::quant::matmul_nbits_parts(
                g,
                x,
                &tensors,
                node_name,
                self.settings.int4_block_size,
                dtype,
                self.settings.int4_accuracy_level,
                None,
            )?
        } else {
            let w_name = format!("{node_name}.weight");
            let w = if let [t] = tensors.as_slice() {
                g.initializer_with(&w_name, dtype, &[in_dim, total_out], |sink| write_transposed(t, dtype, sink))?
            } else {
                g.initializer_with(&w_name, dtype, &[in_dim, total_out], |sink| {
                    // Row r of the fused (in, out) matrix is row r of each part's transpose.
                    let parts: Vec<Vec<f32>> = tensors.iter().map(to_f32_vec).collect();
                    let mut row = Vec::with_capacity(total_out * dtype.size_bytes());
                    for r in 0..in_dim {
                        row.clear();
                        for (p, &out) in parts.iter().zip(out_dims) {
                            for o in 0..out {
                                push_f32(dtype, p[o * in_dim + r], &mut row);
                            }
                        }
                        sink.write(&row)?;
                    }
                    Ok(())
                })?
            };
            g.node("MatMul", node_name).inputs(&[x, &w]).out()
        };
        for p in hf_prefixes {
            self.ck.release(&format!("{p}.weight"));
        }
        self.advance(read);
        self.with_bias(g, y, node_name, hf_prefixes, out_dims, bias)
    }

    /// `y` plus the projections' concatenated biases when `bias`.
    fn with_bias(
        &self,
        g: &mut Graph,
        y: String,
        node_name: &str,
        hf_prefixes: &[String],
        out_dims: &[usize],
        bias: bool,
    ) -> Result<String> {
        if !bias {
            return Ok(y);
        }
        let b = self.bias(g, node_name, hf_prefixes, out_dims)?;
        // A separate Add keeps MatMulNBits on its fastest CUDA path (no bias input).
        Ok(g.node("Add", &format!("{node_name}.bias_add")).inputs(&[&y, &b]).out())
    }

    /// The biases `{prefix}.bias` of `hf_prefixes`, concatenated into one initializer
    /// `{node_name}.bias` (for ops that add a bias themselves, such as FastGelu).
    pub fn bias(&self, g: &mut Graph, node_name: &str, hf_prefixes: &[String], out_dims: &[usize]) -> Result<String> {
        let total_out: usize = out_dims.iter().sum();
        let mut bytes = Vec::with_capacity(total_out * self.dtype.size_bytes());
        for (p, &out) in hf_prefixes.iter().zip(out_dims) {
            let b = self.ck.tensor(&format!("{p}.bias"), &[out])?;
            self.advance(b.data.len());
            for v in to_f32_vec(&b) {
                push_f32(self.dtype, v, &mut bytes);
            }
        }
        g.initializer(&format!("{node_name}.bias"), self.dtype, &[total_out], &bytes)
    }
}
