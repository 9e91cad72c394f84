//! Micro-steps through the stages: in order on the caller's thread, or on a thread per lane
//! (consecutive stages on one device) so that stages on different devices work on different
//! micro-steps at once. Stage k runs the micro-steps in order, so a later prefill chunk of a
//! sequence always finds the KV its earlier chunks wrote into stage k's layers.

use std::ops::Range;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::carried::Carried;
use super::session::{StageKv, StageSession};
use crate::model::{Fetch, StepOutput};
use crate::model_error::{ModelError, Result};
use crate::step_inputs::StepInputs;

/// How stages overlap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipelineMode {
    /// Each micro-step through every stage before the next, on the caller's thread.
    Sequential,
    /// A thread per group of consecutive stages on one device: stages on different devices
    /// overlap (on one device, or the CPU, this is [`Sequential`](Self::Sequential)).
    #[default]
    PerDevice,
    /// A thread per stage, even where stages share a device: on the CPU the stages' sessions
    /// then run at once (the tests' way to run the threaded pipeline).
    PerStage,
}

/// One run through the stages: `inputs` over cache rows `first..`, bringing back `fetch`.
pub(crate) struct MicroStep {
    pub(crate) inputs: StepInputs,
    pub(crate) first: usize,
    pub(crate) fetch: Fetch,
}

/// Where the stages' time went, accumulated over the steps run since the last reset.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct StageTimings {
    /// Each stage's device (None: the CPU).
    pub devices: Vec<Option<i32>>,
    /// Each stage's time in its session runs, with the copies into them.
    pub busy: Vec<Duration>,
    /// Wall time of the steps.
    pub wall: Duration,
    pub micro_steps: usize,
}

impl StageTimings {
    pub(crate) fn new(devices: Vec<Option<i32>>) -> Self {
        let busy = vec![Duration::ZERO; devices.len()];
        StageTimings { devices, busy, wall: Duration::ZERO, micro_steps: 0 }
    }

    /// Each distinct device's busy time (its stages' together), in order of first use.
    pub fn device_busy(&self) -> Vec<(Option<i32>, Duration)> {
        let mut out: Vec<(Option<i32>, Duration)> = Vec::new();
        for (&device, &busy) in self.devices.iter().zip(&self.busy) {
            match out.iter_mut().find(|(d, _)| *d == device) {
                Some((_, total)) => *total += busy,
                None => out.push((device, busy)),
            }
        }
        out
    }

    /// The share of the devices' time spent idle over the wall time: the pipeline bubble (with
    /// one device, what the host spends between runs).
    pub fn bubble(&self) -> f64 {
        let devices = self.device_busy();
        let wall = self.wall.as_secs_f64() * devices.len() as f64;
        if wall <= 0.0 {
            return 0.0;
        }
        let busy: f64 = devices.iter().map(|(_, b)| b.as_secs_f64()).sum();
        (1.0 - busy / wall).max(0.0)
    }
}

/// Runs `stage` for `step`: a CUDA-graph replay with `graph`, else a plain run; then drops the
/// carried values no later stage reads.
fn run_stage(
    stage: &mut StageSession,
    kv: &mut StageKv,
    step: &MicroStep,
    carried: &mut Carried,
    graph: bool,
) -> Result<Option<StepOutput>> {
    let out = if graph {
        let StageKv::Shared { layout, memories } = kv else {
            return Err(ModelError::Graph("CUDA-graph decode needs GroupQueryAttention's fixed-size cache".into()));
        };
        stage.run_graph(step, layout, memories, carried)?
    } else {
        stage.run(step, kv, carried)?
    };
    carried.retain(&stage.keep_after);
    Ok(out)
}

/// Why a lane stopped early.
enum LaneError {
    Failed(ModelError),
    /// A later lane stopped taking micro-steps (it failed).
    Stopped,
}

/// What a lane did: its stages' busy time and, for the last lane, the outputs in order.
type LaneDone = (Vec<Duration>, Vec<StepOutput>);

/// A lane: `stages` (with their caches `kv`) run each micro-step from `input` (the first lane:
/// every step with nothing carried yet) and hand it on to `output` (None for the last lane,
/// whose stage gives the step's output).
fn run_lane(
    stages: &mut [StageSession],
    kv: &mut [StageKv],
    steps: &[MicroStep],
    input: Option<Receiver<(usize, Carried)>>,
    output: Option<SyncSender<(usize, Carried)>>,
    graph: bool,
) -> Result<LaneDone, LaneError> {
    let incoming: Box<dyn Iterator<Item = (usize, Carried)>> = match input {
        Some(rx) => Box::new(rx.into_iter()),
        None => Box::new((0..steps.len()).map(|k| (k, Carried::default()))),
    };
    let mut busy = vec![Duration::ZERO; stages.len()];
    let mut outputs = Vec::new();
    for (k, mut carried) in incoming {
        let mut last = None;
        for (i, stage) in stages.iter_mut().enumerate() {
            let start = Instant::now();
            last = run_stage(stage, &mut kv[i], &steps[k], &mut carried, graph)
                .map_err(|e| LaneError::Failed(e.context(format!("stage over layers {:?}", stage.layers))))?;
            busy[i] += start.elapsed();
        }
        match &output {
            Some(tx) => tx.send((k, carried)).map_err(|_| LaneError::Stopped)?,
            None => outputs.push(
                last.ok_or_else(|| LaneError::Failed(ModelError::Pipeline("the last stage gave no output".into())))?,
            ),
        }
    }
    Ok((busy, outputs))
}

/// Runs `steps` through `stages` (with `kv`, one per stage) on the threads of `lanes`; returns
/// each step's output, in order, and adds the time spent to `timings`.
pub(crate) fn execute(
    stages: &mut [StageSession],
    lanes: &[Range<usize>],
    mut kv: Vec<StageKv>,
    steps: &[MicroStep],
    graph: bool,
    timings: &mut StageTimings,
) -> Result<Vec<StepOutput>> {
    let start = Instant::now();
    let result = if lanes.len() <= 1 {
        run_lane(stages, &mut kv, steps, None, None, graph).map_err(|e| match e {
            LaneError::Failed(e) => e,
            LaneError::Stopped => ModelError::Pipeline("the pipeline stopped".into()),
        })
    } else {
        run_threaded(stages, lanes, kv, steps, graph)
    };
    let (busy, outputs) = result?;
    for (total, b) in timings.busy.iter_mut().zip(busy) {
        *total += b;
    }
    timings.wall += start.elapsed();
    timings.micro_steps += steps.len();
    if outputs.len() != steps.len() {
        return Err(ModelError::Pipeline(format!(
            "the pipeline gave {} outputs for {} micro-steps",
            outputs.len(),
            steps.len()
        )));
    }
    Ok(outputs)
}

/// [`execute`] with a thread per lane, micro-steps passed on through bounded channels.
fn run_threaded(
    stages: &mut [StageSession],
    lanes: &[Range<usize>],
    kv: Vec<StageKv>,
    steps: &[MicroStep],
    graph: bool,
) -> Result<LaneDone> {
    let mut rest = stages;
    let mut kv = kv.into_iter();
    let mut parts = Vec::with_capacity(lanes.len());
    for lane in lanes {
        let (mine, others) = rest.split_at_mut(lane.len());
        rest = others;
        parts.push((mine, kv.by_ref().take(lane.len()).collect::<Vec<_>>()));
    }
    let (mut senders, mut receivers): (Vec<_>, Vec<_>) =
        (1..lanes.len()).map(|_| sync_channel::<(usize, Carried)>(steps.len().max(1))).unzip();
    let results: Vec<Result<LaneDone, LaneError>> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(parts.len());
        let mut receivers = receivers.drain(..).map(Some).collect::<Vec<_>>();
        receivers.insert(0, None);
        let mut senders = senders.drain(..).map(Some).collect::<Vec<_>>();
        senders.push(None);
        for ((stages, mut kv), (input, output)) in parts.into_iter().zip(receivers.into_iter().zip(senders)) {
            handles.push(scope.spawn(move || run_lane(stages, &mut kv, steps, input, output, graph)));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(LaneError::Failed(ModelError::Pipeline("a pipeline thread panicked".into())))
                })
            })
            .collect()
    });
    let mut busy = Vec::new();
    let mut outputs = Vec::new();
    let mut stopped = false;
    for result in results {
        match result {
            Ok((b, o)) => {
                busy.extend(b);
                outputs = o;
            }
            Err(LaneError::Failed(e)) => return Err(e),
            Err(LaneError::Stopped) => stopped = true,
        }
    }
    if stopped && outputs.len() != steps.len() {
        return Err(ModelError::Pipeline("the pipeline stopped".into()).context("a stage stopped taking micro-steps"));
    }
    Ok((busy, outputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bubble_is_the_devices_idle_share() {
        let ms = Duration::from_millis;
        let t =
            StageTimings { devices: vec![Some(0), Some(1)], busy: vec![ms(50), ms(50)], wall: ms(100), micro_steps: 2 };
        assert!((t.bubble() - 0.5).abs() < 1e-9);
        let overlapped = StageTimings { wall: ms(60), ..t.clone() };
        assert!((overlapped.bubble() - (1.0 - 100.0 / 120.0)).abs() < 1e-9);
        let shared = StageTimings { devices: vec![Some(0), Some(0)], ..t };
        assert_eq!(shared.device_busy(), vec![(Some(0), ms(100))]);
        assert!(shared.bubble().abs() < 1e-9);
    }
}
