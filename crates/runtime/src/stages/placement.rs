//! Which device each stage runs on, and which stages share a pipeline thread.

use std::ops::Range;

use crate::model_error::{ModelError, Result};

use super::PipelineMode;
use crate::ep::ExecutionProvider;

/// `ep` moved to CUDA device `device` (the CPU stays the CPU).
fn on_device(ep: &ExecutionProvider, device: i32) -> ExecutionProvider {
    let mut ep = ep.clone();
    match &mut ep {
        ExecutionProvider::Cpu { .. } => {}
        ExecutionProvider::Cuda(o) => o.device_id = device,
        ExecutionProvider::TensorRt(o) => {
            o.device_id = device;
            o.cuda.device_id = device;
        }
    }
    ep
}

/// The execution provider of each of `stages` stages: `ep` on `devices` (see
/// [`StageOptions::with_devices`](super::StageOptions::with_devices)), or every stage on `ep`'s
/// own device when `devices` is empty.
pub(crate) fn stage_eps(ep: &ExecutionProvider, devices: &[i32], stages: usize) -> Result<Vec<ExecutionProvider>> {
    if devices.is_empty() {
        return Ok(vec![ep.clone(); stages]);
    }
    if ep.device_id().is_none() {
        return Err(ModelError::Placement(
            "--devices places stages on GPUs: it needs --ep cuda (on the CPU every stage runs on the CPU)".into(),
        ));
    }
    if let Some(bad) = devices.iter().find(|&&d| d < 0) {
        return Err(ModelError::Placement(format!("--devices: device id {bad} is negative")));
    }
    if devices.len() > stages {
        let hint = if stages == 1 {
            format!("export with pio-export --stages {} to split it", devices.len())
        } else {
            format!("give at most {stages} devices")
        };
        return Err(ModelError::Placement(format!(
            "--devices lists {} devices, but the graph has {stages} stage(s): {hint}",
            devices.len()
        )));
    }
    Ok((0..stages).map(|i| on_device(ep, devices[i * devices.len() / stages])).collect())
}

/// The pipeline's threads: consecutive stages each thread runs, in order. One lane runs every
/// stage on the caller's thread.
pub(crate) fn lanes(eps: &[ExecutionProvider], mode: PipelineMode) -> Vec<Range<usize>> {
    let n = eps.len();
    match mode {
        PipelineMode::Sequential => std::iter::once(0..n).collect(),
        PipelineMode::PerStage => (0..n).map(|i| i..i + 1).collect(),
        PipelineMode::PerDevice => {
            let mut lanes: Vec<Range<usize>> = Vec::new();
            for (i, ep) in eps.iter().enumerate() {
                match lanes.last_mut() {
                    Some(lane) if eps[lane.start].device_id() == ep.device_id() => lane.end = i + 1,
                    _ => lanes.push(i..i + 1),
                }
            }
            lanes
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ep::CudaOptions;

    fn cuda(device: i32) -> ExecutionProvider {
        ExecutionProvider::Cuda(CudaOptions::new(device))
    }

    #[test]
    fn devices_spread_over_the_stages_in_order() {
        let ids = |eps: Vec<ExecutionProvider>| eps.iter().map(|e| e.device_id().unwrap()).collect::<Vec<_>>();
        assert_eq!(ids(stage_eps(&cuda(3), &[], 3).unwrap()), [3, 3, 3]);
        assert_eq!(ids(stage_eps(&cuda(0), &[0, 1], 2).unwrap()), [0, 1]);
        assert_eq!(ids(stage_eps(&cuda(0), &[4, 5], 4).unwrap()), [4, 4, 5, 5]);
        assert_eq!(ids(stage_eps(&cuda(0), &[0, 1, 2], 4).unwrap()), [0, 0, 1, 2]);
    }

    #[test]
    fn bad_devices_are_refused_by_name() {
        let err = stage_eps(&cuda(0), &[0, 1, 2], 2).unwrap_err().to_string();
        assert!(err.contains("--devices") && err.contains("2 stage"), "{err}");
        let err = stage_eps(&cuda(0), &[0, 1], 1).unwrap_err().to_string();
        assert!(err.contains("--stages 2"), "{err}");
        let err = stage_eps(&ExecutionProvider::default(), &[0], 2).unwrap_err().to_string();
        assert!(err.contains("--ep cuda"), "{err}");
        assert!(stage_eps(&cuda(0), &[-1], 2).unwrap_err().to_string().contains("negative"));
    }

    #[test]
    fn lanes_group_stages_by_device() {
        let eps = stage_eps(&cuda(0), &[0, 1], 4).unwrap();
        assert_eq!(lanes(&eps, PipelineMode::PerDevice), vec![0..2, 2..4]);
        assert_eq!(lanes(&eps, PipelineMode::Sequential), vec![0..4]);
        assert_eq!(lanes(&eps, PipelineMode::PerStage), vec![0..1, 1..2, 2..3, 3..4]);
        let cpu = vec![ExecutionProvider::default(); 3];
        assert_eq!(lanes(&cpu, PipelineMode::PerDevice), vec![0..3]);
    }
}
