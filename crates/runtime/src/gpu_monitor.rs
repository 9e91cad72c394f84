//! GPU power, energy and memory while a benchmark runs (NVML), and the host process's memory (`/proc/self/status`).
//!
//! NVML comes from the NVIDIA driver (`libnvidia-ml.so.1`), loaded at run time by `nvml-wrapper`: this builds and
//! runs everywhere, and [`GpuMonitor::start`] fails with an error naming NVML where there is no driver.
//!
//! ```no_run
//! use std::time::Duration;
//! let monitor = pio_runtime::gpu_monitor::GpuMonitor::start(0, Duration::from_millis(50))?;
//! // ... run the benchmark ...
//! let stats = monitor.stop();
//! println!("{:.1} W average, {:.1} J, peak {} bytes", stats.avg_power_w, stats.energy_joules, stats.peak_memory_bytes);
//! # Ok::<(), pio_runtime::gpu_monitor::GpuMonitorError>(())
//! ```

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use serde::Serialize;

/// Why GPU monitoring cannot start or read a device; NVML's error (or the thread spawn's) is the source.
#[derive(Debug, thiserror::Error)]
pub enum GpuMonitorError {
    /// No NVIDIA driver here: `libnvidia-ml.so.1` does not load.
    #[error(
        "NVML is not available (cannot load libnvidia-ml.so.1); GPU power and memory monitoring needs the NVIDIA driver"
    )]
    NvmlUnavailable(#[source] NvmlError),
    #[error("cannot initialize NVML")]
    Init(#[source] NvmlError),
    /// No GPU `index`, or NVML may not open it.
    #[error("NVML cannot open GPU {index}")]
    OpenDevice {
        index: u32,
        #[source]
        source: NvmlError,
    },
    /// `what` is the reading: `memory`, `name`.
    #[error("NVML cannot read the {what} of GPU {index}")]
    Read {
        what: &'static str,
        index: u32,
        #[source]
        source: NvmlError,
    },
    #[error("NVML cannot read the driver version")]
    DriverVersion(#[source] NvmlError),
    #[error("cannot start the GPU monitor thread")]
    Thread(#[source] std::io::Error),
}

type Result<T, E = GpuMonitorError> = std::result::Result<T, E>;

/// One reading of the device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct GpuSample {
    /// Seconds since [`GpuMonitor::start`].
    pub t_s: f64,
    /// Board power draw (`nvmlDeviceGetPowerUsage`), milliwatts; None where unsupported.
    pub power_mw: Option<u32>,
    /// Energy since the driver loaded (`nvmlDeviceGetTotalEnergyConsumption`, Volta and newer), millijoules.
    pub energy_mj: Option<u64>,
    /// Device memory in use by all processes (`nvmlDeviceGetMemoryInfo`), bytes.
    pub memory_used_bytes: u64,
    /// Device memory used by this process (from the running compute processes), bytes; None when NVML does not
    /// list it (e.g. another PID namespace).
    pub process_memory_bytes: Option<u64>,
}

/// What [`GpuMonitor::stop`] reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuStats {
    /// Mean power over the run, watts: energy / duration (0 when neither energy nor power could be read).
    pub avg_power_w: f64,
    /// Highest device memory in use (all processes), bytes.
    pub peak_memory_bytes: u64,
    /// Device memory in use when monitoring started, bytes (subtract for what the run added).
    pub start_memory_bytes: u64,
    /// Highest memory NVML attributed to this process, bytes.
    pub peak_process_memory_bytes: Option<u64>,
    /// Energy over the run, joules: the difference of the energy counter where the device has one, else power
    /// integrated over the samples (trapezoids).
    pub energy_joules: f64,
    /// True when `energy_joules` came from the energy counter.
    pub energy_from_counter: bool,
    /// Samples taken (including the first at start and the last at stop).
    pub samples: usize,
    /// Seconds from the first to the last sample.
    pub duration_s: f64,
}

/// Samples one GPU on a background thread until [`stop`](GpuMonitor::stop).
pub struct GpuMonitor {
    stop_tx: mpsc::Sender<()>,
    handle: JoinHandle<Vec<GpuSample>>,
}

impl GpuMonitor {
    /// Starts sampling device `device_index` every `interval` (at least 1 ms). The first sample is taken before this
    /// returns, so a bad index or a missing driver is an error here.
    pub fn start(device_index: u32, interval: Duration) -> Result<Self> {
        let nvml = Arc::new(init_nvml()?);
        let t0 = Instant::now();
        let first = {
            let device = open(&nvml, device_index)?;
            sample(&device, t0).map_err(|source| GpuMonitorError::Read {
                what: "memory",
                index: device_index,
                source,
            })?
        };
        let interval = interval.max(Duration::from_millis(1));
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name(format!("gpu-monitor-{device_index}"))
            .spawn(move || {
                let mut samples = vec![first];
                let Ok(device) = nvml.device_by_index(device_index) else {
                    return samples;
                };
                loop {
                    let stop = match stop_rx.recv_timeout(interval) {
                        Err(RecvTimeoutError::Timeout) => false,
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
                    };
                    match sample(&device, t0) {
                        Ok(s) => samples.push(s),
                        Err(e) => tracing::debug!("GPU {device_index}: NVML sample failed: {e}"),
                    }
                    if stop {
                        return samples;
                    }
                }
            })
            .map_err(GpuMonitorError::Thread)?;
        Ok(GpuMonitor { stop_tx, handle })
    }

    /// Stops sampling (taking one last sample) and summarizes.
    pub fn stop(self) -> GpuStats {
        let _ = self.stop_tx.send(());
        let samples = self.handle.join().unwrap_or_default();
        summarize(&samples)
    }
}

/// Name, total memory (bytes) and driver version of GPU `index`.
pub fn device_info(index: u32) -> Result<(String, u64, String)> {
    let nvml = init_nvml()?;
    let device = open(&nvml, index)?;
    let name = device.name().map_err(|source| GpuMonitorError::Read { what: "name", index, source })?;
    let total = device.memory_info().map_err(|source| GpuMonitorError::Read { what: "memory", index, source })?.total;
    let driver = nvml.sys_driver_version().map_err(GpuMonitorError::DriverVersion)?;
    Ok((name, total, driver))
}

/// Used, free and total memory of GPU `index` now, bytes.
pub fn device_memory(index: u32) -> Result<(u64, u64, u64)> {
    let nvml = init_nvml()?;
    let m =
        open(&nvml, index)?.memory_info().map_err(|source| GpuMonitorError::Read { what: "memory", index, source })?;
    Ok((used_bytes(&m), m.free, m.total))
}

/// Memory in use: NVML's `used`, or what free and reserved leave of the total where a driver reports `used` as 0.
fn used_bytes(m: &nvml_wrapper::struct_wrappers::device::MemoryInfo) -> u64 {
    m.used.max(m.total.saturating_sub(m.free).saturating_sub(m.reserved))
}

/// The most memory this process has had resident (`VmHWM`), bytes; None off Linux.
pub fn host_peak_rss_bytes() -> Option<u64> {
    proc_status_kib("VmHWM").map(|k| k * 1024)
}

/// The memory this process has resident now (`VmRSS`), bytes; None off Linux.
pub fn host_rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS").map(|k| k * 1024)
}

fn proc_status_kib(key: &str) -> Option<u64> {
    parse_status_kib(&std::fs::read_to_string("/proc/self/status").ok()?, key)
}

/// The value of a `Key:   123 kB` line of `/proc/<pid>/status`, in KiB.
fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        matches!(parts.next(), Some("kB") | None).then_some(value)
    })
}

fn init_nvml() -> Result<Nvml> {
    Nvml::init().map_err(|e| match e {
        NvmlError::LibloadingError(_) => GpuMonitorError::NvmlUnavailable(e),
        other => GpuMonitorError::Init(other),
    })
}

fn open(nvml: &Nvml, index: u32) -> Result<Device<'_>> {
    nvml.device_by_index(index).map_err(|source| GpuMonitorError::OpenDevice { index, source })
}

fn sample(device: &Device<'_>, t0: Instant) -> Result<GpuSample, NvmlError> {
    let t_s = t0.elapsed().as_secs_f64();
    let memory_used_bytes = used_bytes(&device.memory_info()?);
    let pid = std::process::id();
    let process_memory_bytes = device.running_compute_processes().ok().and_then(|ps| {
        ps.into_iter().find(|p| p.pid == pid).and_then(|p| match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        })
    });
    Ok(GpuSample {
        t_s,
        power_mw: device.power_usage().ok(),
        energy_mj: device.total_energy_consumption().ok(),
        memory_used_bytes,
        process_memory_bytes,
    })
}

/// Summarizes samples in time order (see [`GpuStats`]).
pub fn summarize(samples: &[GpuSample]) -> GpuStats {
    let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
        return GpuStats {
            avg_power_w: 0.0,
            peak_memory_bytes: 0,
            start_memory_bytes: 0,
            peak_process_memory_bytes: None,
            energy_joules: 0.0,
            energy_from_counter: false,
            samples: 0,
            duration_s: 0.0,
        };
    };
    let duration_s = (last.t_s - first.t_s).max(0.0);
    let counter = match (first.energy_mj, last.energy_mj) {
        (Some(a), Some(b)) if b >= a && samples.len() >= 2 => Some((b - a) as f64 / 1000.0),
        _ => None,
    };
    let powered: Vec<(f64, f64)> =
        samples.iter().filter_map(|s| s.power_mw.map(|p| (s.t_s, p as f64 / 1000.0))).collect();
    let integrated = powered.windows(2).map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0).sum::<f64>();
    let energy_joules = counter.unwrap_or(integrated);
    let avg_power_w = if duration_s > 0.0 && (counter.is_some() || powered.len() >= 2) {
        energy_joules / duration_s
    } else if !powered.is_empty() {
        powered.iter().map(|(_, w)| w).sum::<f64>() / powered.len() as f64
    } else {
        0.0
    };
    GpuStats {
        avg_power_w,
        peak_memory_bytes: samples.iter().map(|s| s.memory_used_bytes).max().unwrap_or(0),
        start_memory_bytes: first.memory_used_bytes,
        peak_process_memory_bytes: samples.iter().filter_map(|s| s.process_memory_bytes).max(),
        energy_joules,
        energy_from_counter: counter.is_some(),
        samples: samples.len(),
        duration_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t_s: f64, power_mw: Option<u32>, energy_mj: Option<u64>, mem: u64) -> GpuSample {
        GpuSample { t_s, power_mw, energy_mj, memory_used_bytes: mem, process_memory_bytes: None }
    }

    #[test]
    fn energy_counter_is_preferred() {
        let samples = [
            s(0.0, Some(100_000), Some(1_000_000), 10),
            s(1.0, Some(300_000), Some(1_150_000), 30),
            s(2.0, Some(200_000), Some(1_400_000), 20),
        ];
        let st = summarize(&samples);
        assert!(st.energy_from_counter);
        assert!((st.energy_joules - 400.0).abs() < 1e-9, "{st:?}");
        assert!((st.avg_power_w - 200.0).abs() < 1e-9, "{st:?}");
        assert_eq!(st.peak_memory_bytes, 30);
        assert_eq!(st.start_memory_bytes, 10);
        assert_eq!(st.samples, 3);
        assert!((st.duration_s - 2.0).abs() < 1e-12);
    }

    #[test]
    fn power_is_integrated_without_the_counter() {
        // 100 W -> 300 W over 1 s (200 J), 300 W -> 200 W over 1 s (250 J).
        let samples = [s(0.0, Some(100_000), None, 5), s(1.0, Some(300_000), None, 7), s(2.0, Some(200_000), None, 6)];
        let st = summarize(&samples);
        assert!(!st.energy_from_counter);
        assert!((st.energy_joules - 450.0).abs() < 1e-9, "{st:?}");
        assert!((st.avg_power_w - 225.0).abs() < 1e-9, "{st:?}");
        // A counter that went backwards (driver reload) is not trusted.
        let samples = [s(0.0, Some(100_000), Some(50), 0), s(1.0, Some(100_000), Some(10), 0)];
        let st = summarize(&samples);
        assert!(!st.energy_from_counter);
        assert!((st.energy_joules - 100.0).abs() < 1e-9);
    }

    #[test]
    fn degenerate_sample_sets() {
        let st = summarize(&[]);
        assert_eq!((st.samples, st.energy_joules, st.avg_power_w), (0, 0.0, 0.0));
        let st = summarize(&[s(0.5, Some(150_000), Some(7), 42)]);
        assert_eq!(st.samples, 1);
        assert_eq!(st.energy_joules, 0.0);
        assert!((st.avg_power_w - 150.0).abs() < 1e-9);
        assert_eq!(st.peak_memory_bytes, 42);
        let st = summarize(&[s(0.0, None, None, 1), s(1.0, None, None, 2)]);
        assert_eq!((st.energy_joules, st.avg_power_w), (0.0, 0.0));
        let mut a = s(0.0, None, None, 1);
        a.process_memory_bytes = Some(9);
        let mut b = s(1.0, None, None, 1);
        b.process_memory_bytes = Some(4);
        assert_eq!(summarize(&[a, b]).peak_process_memory_bytes, Some(9));
    }

    #[test]
    fn proc_status_lines() {
        let status = "Name:\tpio\nVmPeak:\t  300 kB\nVmHWM:\t   2048 kB\nVmRSS:\t   1024 kB\nThreads:\t4\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(2048));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(1024));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        assert_eq!(parse_status_kib(status, "Vm"), None);
    }

    #[test]
    fn host_rss_is_plausible() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let rss = host_rss_bytes().expect("VmRSS");
        let peak = host_peak_rss_bytes().expect("VmHWM");
        assert!(rss > 1 << 20 && rss < 1 << 40, "rss {rss}");
        // Touch 64 MiB: the peak covers it.
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let peak2 = host_peak_rss_bytes().unwrap();
        assert!(peak2 >= peak && peak2 >= 64 << 20, "peak {peak} -> {peak2}");
    }

    /// Passes with or without a GPU: without NVML the error must say so; with one, sampling must give numbers.
    #[test]
    fn monitor_starts_or_names_nvml() {
        match GpuMonitor::start(0, Duration::from_millis(10)) {
            Err(e) => {
                let msg = e.to_string();
                eprintln!("no GPU monitoring here: {msg}");
                assert!(msg.contains("NVML"), "{msg}");
                assert!(std::error::Error::source(&e).is_some_and(|s| s.is::<NvmlError>()), "{e:?}");
                assert!(device_info(0).unwrap_err().to_string().contains("NVML"));
            }
            Ok(m) => {
                std::thread::sleep(Duration::from_millis(100));
                let st = m.stop();
                eprintln!("GPU 0: {st:?}");
                assert!(st.samples >= 3, "{st:?}");
                // An idle GPU can read 0 bytes used (NVML's v2 memory info counts reserved memory apart).
                assert!(st.duration_s > 0.05 && st.peak_memory_bytes >= st.start_memory_bytes, "{st:?}");
                assert!(st.avg_power_w >= 0.0 && st.avg_power_w < 5000.0, "{st:?}");
                eprintln!("GPU 0 memory (used, free, total): {:?}", device_memory(0).unwrap());
                let (name, total, driver) = device_info(0).unwrap();
                eprintln!("GPU 0: {name}, {total} bytes, driver {driver}");
                assert!(!name.is_empty() && total >= st.peak_memory_bytes && !driver.is_empty());
                // A device that does not exist is an error naming it.
                let err = GpuMonitor::start(999, Duration::from_millis(10)).err().unwrap();
                assert!(matches!(err, GpuMonitorError::OpenDevice { index: 999, .. }), "{err:?}");
                assert!(err.to_string().contains("GPU 999"), "{err}");
            }
        }
    }
}
