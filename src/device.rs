//! Where a model runs: the user's choice (`auto`, `cpu`, `cuda[:N]`, `metal[:N]`), the devices
//! this build and this machine offer (and why one is not offered), opening one, and which
//! number formats a device can train in.
//!
//! GPU support is compiled in with the `cuda` / `metal` features. The ops themselves are
//! device-generic: on a GPU every fused CPU kernel falls back to composite candle ops, the same
//! path `FINCH_FUSED=0` runs on the CPU (see [`crate::kernels::KernelPath`]).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The kind of device a [`DeviceChoice`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// The first GPU offered, else the CPU.
    Auto,
    Cpu,
    Cuda,
    Metal,
}

/// A device as the user names it: `auto`, `cpu`, `cuda`, `cuda:N`, `metal`, `metal:N`
/// (written the same way in `config.toml`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceChoice {
    kind: DeviceKind,
    ordinal: usize,
}

#[allow(non_upper_case_globals)]
impl DeviceChoice {
    pub const Auto: DeviceChoice = DeviceChoice::new(DeviceKind::Auto, 0);
    pub const Cpu: DeviceChoice = DeviceChoice::new(DeviceKind::Cpu, 0);
    /// The first CUDA GPU (`cuda:0`).
    pub const Cuda: DeviceChoice = DeviceChoice::new(DeviceKind::Cuda, 0);
    /// The first Metal GPU.
    pub const Metal: DeviceChoice = DeviceChoice::new(DeviceKind::Metal, 0);
}

impl DeviceChoice {
    const fn new(kind: DeviceKind, ordinal: usize) -> Self {
        DeviceChoice { kind, ordinal }
    }

    /// CUDA GPU number `ordinal` (as `nvidia-smi` numbers them, after `CUDA_VISIBLE_DEVICES`).
    pub const fn cuda(ordinal: usize) -> Self {
        DeviceChoice::new(DeviceKind::Cuda, ordinal)
    }

    pub const fn metal(ordinal: usize) -> Self {
        DeviceChoice::new(DeviceKind::Metal, ordinal)
    }

    pub fn kind(self) -> DeviceKind {
        self.kind
    }

    /// The GPU number (0 for `auto` and `cpu`).
    pub fn ordinal(self) -> usize {
        self.ordinal
    }

    /// Parses `auto|cpu|cuda[:N]|metal[:N]` (case-insensitive).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        let (name, ordinal) = match s.split_once(':') {
            Some((name, n)) => match n.parse::<usize>() {
                Ok(n) => (name, Some(n)),
                Err(_) => return Err(bad_choice(&s)),
            },
            None => (s.as_str(), None),
        };
        let kind = match name {
            "auto" => DeviceKind::Auto,
            "cpu" => DeviceKind::Cpu,
            "cuda" | "gpu" => DeviceKind::Cuda,
            "metal" | "mps" => DeviceKind::Metal,
            _ => return Err(bad_choice(&s)),
        };
        match (kind, ordinal) {
            (DeviceKind::Auto | DeviceKind::Cpu, Some(_)) => Err(bad_choice(&s)),
            (kind, n) => Ok(DeviceChoice::new(kind, n.unwrap_or(0))),
        }
    }

    /// The CPU for work that only runs there (`what`, e.g. `--quantized`): `auto` and `cpu` give
    /// the CPU, a GPU is an error naming `what`.
    pub fn cpu_only(self, what: &str) -> Result<Device> {
        kernel_path_setting()?;
        match self.kind {
            DeviceKind::Auto | DeviceKind::Cpu => Ok(Device::Cpu),
            _ => Err(Error::config(
                "device",
                format!("{what} runs on the CPU only: drop --device {self} or use --device cpu"),
            )),
        }
    }

    /// Opens the device. `auto` takes the first GPU [`offered`] and falls back to the CPU.
    pub fn open(self) -> Result<Device> {
        kernel_path_setting()?;
        match self.kind {
            DeviceKind::Cpu => Ok(Device::Cpu),
            DeviceKind::Auto => Ok(offered()
                .into_iter()
                .filter(|o| o.unavailable.is_none() && o.choice.kind != DeviceKind::Cpu)
                .find_map(|o| o.choice.open().ok())
                .unwrap_or(Device::Cpu)),
            DeviceKind::Cuda => open_cuda(self.ordinal),
            DeviceKind::Metal => open_metal(self.ordinal),
        }
    }
}

fn bad_choice(s: &str) -> Error {
    Error::config(
        "device",
        format!("`{s}` is not one of auto, cpu, cuda, cuda:N, metal, metal:N"),
    )
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.kind {
            DeviceKind::Auto => "auto",
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Metal => "metal",
        };
        match self.kind {
            DeviceKind::Cuda | DeviceKind::Metal if self.ordinal > 0 => write!(f, "{name}:{}", self.ordinal),
            _ => f.write_str(name),
        }
    }
}

/// Same as `Display` (lower case, as in `config.toml` and on the command line).
impl fmt::Debug for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Default for DeviceChoice {
    fn default() -> Self {
        DeviceChoice::Auto
    }
}

impl FromStr for DeviceChoice {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        DeviceChoice::parse(s)
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DeviceChoice::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One entry of the device list a user picks from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOffer {
    pub choice: DeviceChoice,
    /// What it is, e.g. `CPU (16 threads)` or `NVIDIA H200 — compute capability 9.0, 139 GiB`.
    pub label: String,
    /// Why it cannot be used (`None`: it can), e.g. "built without CUDA".
    pub unavailable: Option<String>,
}

impl DeviceOffer {
    pub fn is_usable(&self) -> bool {
        self.unavailable.is_none()
    }
}

/// Every device kind with what this build and machine offer: the CPU, each CUDA GPU (or one
/// CUDA entry saying why there is none), Metal likewise. Cheap enough to call from a UI page.
pub fn offered() -> Vec<DeviceOffer> {
    let mut out = vec![DeviceOffer {
        choice: DeviceChoice::Cpu,
        label: format!("CPU ({} threads)", crate::kernels::cpu::threads()),
        unavailable: None,
    }];
    out.extend(cuda_offers());
    out.push(metal_offer());
    out
}

/// The `--device` value of a device, e.g. `cpu` or `cuda:1`.
pub fn name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => DeviceChoice::cuda(gpu_id).to_string(),
        candle_core::DeviceLocation::Metal { gpu_id } => DeviceChoice::metal(gpu_id).to_string(),
    }
}

/// Checks that `device` can hold and train a base model in `dtype`: bf16 on CUDA needs compute
/// capability 8.0 (Ampere) or newer.
pub fn check_precision(device: &Device, dtype: DType) -> Result<()> {
    if dtype != DType::BF16 {
        return Ok(());
    }
    if let candle_core::DeviceLocation::Cuda { gpu_id } = device.location() {
        if let Some((major, minor)) = cuda::compute_capability(gpu_id) {
            if major < 8 {
                return Err(Error::config(
                    "precision",
                    format!(
                        "bf16 needs an NVIDIA GPU of compute capability 8.0 or newer; cuda:{gpu_id} is {major}.{minor}: use f16 or f32"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `FINCH_FUSED`, checked: the commands that run a model report a value Finch does not know.
pub fn kernel_path_setting() -> Result<crate::kernels::KernelPath> {
    crate::kernels::kernel_path_from_env().map_err(|e| Error::config("FINCH_FUSED", e))
}

/// Compute capability this build's CUDA kernels were compiled for (`CUDA_COMPUTE_CAP` at build
/// time, e.g. 90), when known. Kernels built for 9.0 do not load on older GPUs.
pub fn built_compute_cap() -> Option<u32> {
    option_env!("CUDA_COMPUTE_CAP").and_then(|v| v.trim().parse().ok())
}

fn open_cuda(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "cuda") {
        return Err(Error::config(
            "device",
            "this Finch was built without CUDA: rebuild with `--features cuda` (scripts/build-cuda.sh)",
        ));
    }
    let gpus = cuda::gpus().map_err(|why| Error::config("device", format!("cuda:{ordinal}: {why}")))?;
    let Some(gpu) = gpus.get(ordinal) else {
        return Err(Error::config(
            "device",
            format!(
                "there is no cuda:{ordinal}: this machine has {} CUDA GPU(s)",
                gpus.len()
            ),
        ));
    };
    if let Some(why) = cuda_refusal(gpu) {
        return Err(Error::config("device", format!("cuda:{ordinal}: {why}")));
    }
    Device::new_cuda(ordinal).map_err(|e| Error::config("device", format!("cannot open cuda:{ordinal}: {e}")))
}

/// Why this build cannot use `gpu`, if it cannot: kernels compiled for a newer GPU do not load.
fn cuda_refusal(gpu: &Gpu) -> Option<String> {
    let cap = gpu.major * 10 + gpu.minor;
    match built_compute_cap() {
        Some(b) if cap < b => Some(format!(
            "this build's kernels need compute capability {}.{} or newer, the GPU has {}.{} (rebuild with CUDA_COMPUTE_CAP={cap})",
            b / 10,
            b % 10,
            gpu.major,
            gpu.minor
        )),
        _ => None,
    }
}

fn open_metal(ordinal: usize) -> Result<Device> {
    if !cfg!(feature = "metal") {
        return Err(Error::config(
            "device",
            "this Finch was built without Metal: on a Mac, rebuild with `--features metal`",
        ));
    }
    Device::new_metal(ordinal).map_err(|e| Error::config("device", format!("cannot open metal:{ordinal}: {e}")))
}

fn cuda_offers() -> Vec<DeviceOffer> {
    let unavailable = |why: String| {
        vec![DeviceOffer {
            choice: DeviceChoice::Cuda,
            label: "CUDA".into(),
            unavailable: Some(why),
        }]
    };
    if !cfg!(feature = "cuda") {
        return unavailable("built without CUDA".into());
    }
    match cuda::gpus() {
        Err(why) => unavailable(why),
        Ok(gpus) if gpus.is_empty() => unavailable("no NVIDIA GPU found".into()),
        Ok(gpus) => gpus
            .iter()
            .enumerate()
            .map(|(i, g)| DeviceOffer {
                choice: DeviceChoice::cuda(i),
                label: format!(
                    "{} — compute capability {}.{}, {:.0} GiB",
                    g.name,
                    g.major,
                    g.minor,
                    g.memory_bytes as f64 / (1u64 << 30) as f64
                ),
                unavailable: cuda_refusal(g),
            })
            .collect(),
    }
}

fn metal_offer() -> DeviceOffer {
    let unavailable = if !cfg!(feature = "metal") {
        Some("built without Metal".to_string())
    } else {
        Device::new_metal(0).err().map(|e| format!("no Metal GPU found ({e})"))
    };
    DeviceOffer {
        choice: DeviceChoice::Metal,
        label: "Metal".into(),
        unavailable,
    }
}

/// What the CUDA driver reports about one GPU.
#[allow(dead_code)]
struct Gpu {
    name: String,
    major: u32,
    minor: u32,
    memory_bytes: u64,
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{result, sys};

    use super::Gpu;

    /// Why the driver cannot be used, in words a user can act on.
    fn explain(e: result::DriverError) -> String {
        match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => "no NVIDIA GPU found".into(),
            sys::CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH => {
                "the NVIDIA driver's kernel module and libcuda differ in version (reboot or reinstall the driver)"
                    .into()
            }
            sys::CUresult::CUDA_ERROR_STUB_LIBRARY => "no NVIDIA driver found (only a stub libcuda)".into(),
            _ => format!("the NVIDIA driver failed: {e}"),
        }
    }

    #[allow(unsafe_code)]
    pub(super) fn gpus() -> Result<Vec<Gpu>, String> {
        result::init().map_err(explain)?;
        let n = result::device::get_count().map_err(explain)?;
        let mut out = vec![];
        for i in 0..n {
            let dev = result::device::get(i).map_err(explain)?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| format!("CUDA GPU {i}"));
            // SAFETY: `dev` is a device handle the driver just returned; these only read properties.
            let attr = |a| unsafe { result::device::get_attribute(dev, a) }.map_or(0, |v| v as u32);
            out.push(Gpu {
                name,
                major: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                minor: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
                // SAFETY: as above.
                memory_bytes: unsafe { result::device::total_mem(dev) }.map_or(0, |m| m as u64),
            });
        }
        Ok(out)
    }

    pub(super) fn compute_capability(ordinal: usize) -> Option<(u32, u32)> {
        gpus().ok()?.get(ordinal).map(|g| (g.major, g.minor))
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use super::Gpu;

    pub(super) fn gpus() -> Result<Vec<Gpu>, String> {
        Err("built without CUDA".into())
    }

    pub(super) fn compute_capability(_ordinal: usize) -> Option<(u32, u32)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_print_as_written() {
        for s in ["auto", "cpu", "cuda", "cuda:1", "metal", "metal:2"] {
            let c = DeviceChoice::parse(s).unwrap();
            assert_eq!(c.to_string(), s);
            assert_eq!(format!("{c:?}"), s);
        }
        assert_eq!(DeviceChoice::parse("CUDA:0").unwrap(), DeviceChoice::Cuda);
        assert_eq!(DeviceChoice::parse("cuda:3").unwrap().ordinal(), 3);
        for bad in ["", "tpu", "cuda:", "cuda:x", "cpu:1", "auto:0", "cuda:-1"] {
            let e = DeviceChoice::parse(bad).unwrap_err().to_string();
            assert!(e.contains("auto, cpu, cuda, cuda:N, metal"), "{bad}: {e}");
        }
        let json = serde_json::to_string(&DeviceChoice::cuda(2)).unwrap();
        assert_eq!(json, "\"cuda:2\"");
        assert_eq!(
            serde_json::from_str::<DeviceChoice>(&json).unwrap(),
            DeviceChoice::cuda(2)
        );
        assert!(serde_json::from_str::<DeviceChoice>("\"vulkan\"").is_err());
    }

    #[test]
    fn the_cpu_is_always_offered_and_every_refusal_says_why() {
        let offers = offered();
        assert_eq!(offers[0].choice, DeviceChoice::Cpu);
        assert!(offers[0].is_usable());
        for o in &offers {
            if let Some(why) = &o.unavailable {
                assert!(!why.is_empty());
            }
        }
        if !cfg!(feature = "cuda") {
            let cuda = offers.iter().find(|o| o.choice.kind() == DeviceKind::Cuda).unwrap();
            assert_eq!(cuda.unavailable.as_deref(), Some("built without CUDA"));
            let e = DeviceChoice::Cuda.open().unwrap_err().to_string();
            assert!(e.contains("built without CUDA") && e.contains("--features cuda"), "{e}");
        }
        if !cfg!(feature = "metal") {
            let metal = offers.iter().find(|o| o.choice.kind() == DeviceKind::Metal).unwrap();
            assert_eq!(metal.unavailable.as_deref(), Some("built without Metal"));
        }
        // Without a usable GPU, auto is the CPU.
        if offers
            .iter()
            .all(|o| o.choice.kind() == DeviceKind::Cpu || !o.is_usable())
        {
            assert!(DeviceChoice::Auto.open().unwrap().is_cpu());
        }
        assert_eq!(name(&DeviceChoice::Cpu.open().unwrap()), "cpu");
    }

    #[test]
    fn every_precision_is_accepted_on_the_cpu() {
        for dt in [DType::F32, DType::BF16, DType::F16] {
            check_precision(&Device::Cpu, dt).unwrap();
        }
    }
}
