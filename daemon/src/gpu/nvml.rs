//! Reading the node's GPUs through NVML (nvml-wrapper, which `dlopen`s `libnvidia-ml.so.1` at
//! init).
//!
//! [`NvmlReader::open`] initialises NVML once and keeps it for the reader's life; every
//! [`NvmlReader::read`] looks the devices up again (a `Device` borrows the `Nvml`, and a card can
//! disappear between polls). A field the card does not support is `None`, silently; a field that
//! fails for another reason (a lost GPU, a driver fault) is `None` too, and the first such failure
//! on a device is logged once until the device reads cleanly again.
//!
//! Every call here blocks for microseconds to milliseconds: this module must never be called on
//! the async runtime (the monitor calls it from its own thread). It never calls
//! `total_energy_consumption` or `process_utilization_stats`, which take milliseconds each.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;

use super::{GpuProcess, GpuReading};

/// The library nvml-wrapper loads when none is configured.
pub const DEFAULT_NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// Why NVML could not be started.
#[derive(Debug, thiserror::Error)]
pub enum NvmlOpenError {
    /// No NVIDIA driver on this host: the default library is missing, or the kernel driver is not
    /// loaded.
    #[error("no NVIDIA driver: {detail}")]
    NoDriver { detail: String },
    /// The library at `path` (configured, or found under the default name) is not an NVML library.
    #[error("{} is not a usable NVML library: {detail}", path.display())]
    BadLibrary { path: PathBuf, detail: String },
    /// NVML loaded but refused to start (no permission, driver/library mismatch, …).
    #[error("NVML failed to start: {detail}")]
    Init { detail: String },
}

/// One line, whatever the underlying error printed.
fn one_line(text: impl std::fmt::Display) -> String {
    text.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sorts an init failure into the cases the caller acts on. `configured` is the library the
/// operator named, if any: failing to load a named file is a configuration error, while failing
/// to load the default one means there is no driver.
pub fn classify_init_error(error: NvmlError, configured: Option<&Path>) -> NvmlOpenError {
    match (error, configured) {
        (NvmlError::LibloadingError(load), None) => NvmlOpenError::NoDriver {
            detail: one_line(load),
        },
        (NvmlError::LibraryNotFound, None) => NvmlOpenError::NoDriver {
            detail: format!("{DEFAULT_NVML_LIBRARY} not found"),
        },
        (NvmlError::LibloadingError(load), Some(path)) => NvmlOpenError::BadLibrary {
            path: path.to_path_buf(),
            detail: one_line(load),
        },
        (NvmlError::LibraryNotFound, Some(path)) => NvmlOpenError::BadLibrary {
            path: path.to_path_buf(),
            detail: "not found".to_string(),
        },
        (error @ NvmlError::FailedToLoadSymbol(_), configured) => NvmlOpenError::BadLibrary {
            path: configured
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_NVML_LIBRARY)),
            detail: one_line(error),
        },
        (NvmlError::DriverNotLoaded, _) => NvmlOpenError::NoDriver {
            detail: "the NVIDIA kernel driver is not loaded".to_string(),
        },
        (error, _) => NvmlOpenError::Init {
            detail: one_line(error),
        },
    }
}

/// How a failed field read is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldFailure {
    /// The card, driver or user cannot have this field (GeForce cards return `NotSupported` for
    /// some): the field is absent, nothing is logged.
    Unsupported,
    /// The read failed (lost GPU, driver fault): the field is absent and the device is warned
    /// about once.
    Failed,
}

/// Sorts a field read failure.
pub fn classify_field_error(error: &NvmlError) -> FieldFailure {
    match error {
        NvmlError::NotSupported
        | NvmlError::InvalidArg
        | NvmlError::FunctionNotFound
        | NvmlError::FailedToLoadSymbol(_)
        | NvmlError::NoPermission => FieldFailure::Unsupported,
        _ => FieldFailure::Failed,
    }
}

/// Which devices have been warned about since they last read cleanly.
#[derive(Debug, Default)]
pub struct DeviceWarnings {
    warned: HashSet<u32>,
}

impl DeviceWarnings {
    /// Records a failed read on `index`; true when this is the first since the device last read
    /// cleanly (the caller logs then).
    pub fn failed(&mut self, index: u32) -> bool {
        self.warned.insert(index)
    }

    /// Records a clean read of `index`; true when the device had been warned about (the caller
    /// may log its recovery).
    pub fn recovered(&mut self, index: u32) -> bool {
        self.warned.remove(&index)
    }
}

/// NVML, initialised, with the driver version it reported.
pub struct NvmlReader {
    nvml: Nvml,
    driver_version: Option<String>,
    warnings: DeviceWarnings,
}

impl std::fmt::Debug for NvmlReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlReader")
            .field("driver_version", &self.driver_version)
            .finish_non_exhaustive()
    }
}

/// The result of one poll of every device.
#[derive(Debug)]
pub struct NvmlPoll {
    pub gpus: Vec<GpuReading>,
    /// Why `gpus` is empty: the devices could not be counted, or there are none.
    pub note: Option<String>,
}

impl NvmlReader {
    /// Loads `library` (default `libnvidia-ml.so.1`) and initialises NVML. Blocks for about
    /// 10 ms on a GPU host.
    pub fn open(library: Option<&Path>) -> Result<NvmlReader, NvmlOpenError> {
        let init = match library {
            Some(path) => Nvml::builder().lib_path(OsStr::new(path)).init(),
            None => Nvml::init(),
        };
        let nvml = init.map_err(|error| classify_init_error(error, library))?;
        let driver_version = nvml.sys_driver_version().ok();
        Ok(NvmlReader {
            nvml,
            driver_version,
            warnings: DeviceWarnings::default(),
        })
    }

    /// The driver version NVML reported at init, when it did.
    pub fn driver_version(&self) -> Option<&str> {
        self.driver_version.as_deref()
    }

    /// Reads every device once.
    pub fn read(&mut self) -> NvmlPoll {
        let count = match self.nvml.device_count() {
            Ok(count) => count,
            Err(error) => {
                let note = format!("NVML cannot count the GPUs: {}", one_line(error));
                // Index u32::MAX stands for "the whole NVML" in the warn-once set.
                if self.warnings.failed(u32::MAX) {
                    tracing::warn!(%note, "GPU readings unavailable");
                }
                return NvmlPoll {
                    gpus: Vec::new(),
                    note: Some(note),
                };
            }
        };
        if self.warnings.recovered(u32::MAX) {
            tracing::info!("NVML counts the GPUs again");
        }
        let gpus = (0..count).map(|index| self.read_device(index)).collect();
        // A driver with no visible card (a container started without its GPUs, say).
        let note = (count == 0).then(|| "NVML sees no GPU".to_string());
        NvmlPoll { gpus, note }
    }

    fn read_device(&mut self, index: u32) -> GpuReading {
        let mut reading = GpuReading::empty(index);
        let mut failures: Vec<(&'static str, NvmlError)> = Vec::new();
        match self.nvml.device_by_index(index) {
            Ok(device) => {
                reading.name = field(&mut failures, "name", device.name());
                reading.uuid = field(&mut failures, "uuid", device.uuid());
                if let Some(util) = field(
                    &mut failures,
                    "utilization_rates",
                    device.utilization_rates(),
                ) {
                    reading.util_gpu_pct = Some(util.gpu);
                    reading.util_mem_pct = Some(util.memory);
                }
                if let Some(memory) = field(&mut failures, "memory_info", device.memory_info()) {
                    reading.mem_used_bytes = Some(memory.used);
                    reading.mem_total_bytes = Some(memory.total);
                }
                reading.temperature_c = field(
                    &mut failures,
                    "temperature",
                    device.temperature(TemperatureSensor::Gpu),
                );
                reading.power_mw = field(&mut failures, "power_usage", device.power_usage());
                reading.power_limit_mw = field(
                    &mut failures,
                    "enforced_power_limit",
                    device.enforced_power_limit(),
                );
                reading.processes = field(
                    &mut failures,
                    "running_compute_processes",
                    device.running_compute_processes(),
                )
                .map(|processes| {
                    processes
                        .into_iter()
                        .map(|process| GpuProcess {
                            pid: process.pid,
                            used_memory_bytes: match process.used_gpu_memory {
                                UsedGpuMemory::Used(bytes) => Some(bytes),
                                UsedGpuMemory::Unavailable => None,
                            },
                        })
                        .collect()
                });
            }
            Err(error) => {
                field(&mut failures, "device_by_index", Err::<(), _>(error));
            }
        }
        if failures.is_empty() {
            if self.warnings.recovered(index) {
                tracing::info!(gpu = index, "GPU reads cleanly again");
            }
        } else if self.warnings.failed(index) {
            let what = failures
                .iter()
                .map(|(what, error)| format!("{what}: {}", one_line(error)))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(
                gpu = index,
                failures = %what,
                "GPU reading incomplete; further failures on this GPU are not logged until it reads cleanly"
            );
        }
        reading
    }
}

/// The value of a field read, or `None`, recording failures other than "unsupported".
fn field<T>(
    failures: &mut Vec<(&'static str, NvmlError)>,
    what: &'static str,
    result: Result<T, NvmlError>,
) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(error) => {
            if classify_field_error(&error) == FieldFailure::Failed {
                failures.push((what, error));
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_fields_are_absent_not_errors() {
        for error in [
            NvmlError::NotSupported,
            NvmlError::InvalidArg,
            NvmlError::FunctionNotFound,
            NvmlError::NoPermission,
            NvmlError::FailedToLoadSymbol("nvmlDeviceGetComputeRunningProcesses_v3".into()),
        ] {
            assert_eq!(classify_field_error(&error), FieldFailure::Unsupported);
        }
        for error in [
            NvmlError::GpuLost,
            NvmlError::Unknown,
            NvmlError::ResetRequired,
        ] {
            assert_eq!(classify_field_error(&error), FieldFailure::Failed);
        }
    }

    #[test]
    fn init_failures_are_sorted_by_cause() {
        assert!(matches!(
            classify_init_error(NvmlError::DriverNotLoaded, None),
            NvmlOpenError::NoDriver { .. }
        ));
        assert!(matches!(
            classify_init_error(NvmlError::LibraryNotFound, None),
            NvmlOpenError::NoDriver { .. }
        ));
        let bad = classify_init_error(
            NvmlError::FailedToLoadSymbol("nvmlInit_v2".into()),
            Some(Path::new("/opt/lib/libfoo.so")),
        );
        assert!(
            bad.to_string()
                .starts_with("/opt/lib/libfoo.so is not a usable NVML library"),
            "{bad}"
        );
        let init = classify_init_error(NvmlError::NoPermission, None);
        assert!(
            init.to_string().starts_with("NVML failed to start"),
            "{init}"
        );
    }

    #[test]
    fn a_device_is_warned_about_once_until_it_recovers() {
        let mut warnings = DeviceWarnings::default();
        assert!(warnings.failed(0));
        assert!(!warnings.failed(0));
        assert!(warnings.failed(1), "each device has its own warning");
        assert!(warnings.recovered(0));
        assert!(!warnings.recovered(0));
        assert!(
            warnings.failed(0),
            "a new failure after recovery warns again"
        );
    }
}
