//! Where the tensors live: the CPU, or a CUDA GPU in a build with `--features cuda`.

use anyhow::{bail, Context, Result};
use candle_core::Device;

/// The device named by `spec`: `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.to_ascii_lowercase().strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => match rest.strip_prefix(':').map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => bail!("device `{spec}`: expected cpu, cuda or cuda:N with N a GPU number"),
        },
        None => bail!("unknown device `{spec}`: expected cpu, cuda or cuda:N"),
    };
    cuda_device(ordinal, spec)
}

/// Seeds a GPU's random generator, which draws the dropout masks there, so that a run on the
/// same GPU with the same seed repeats itself. The CPU draws masks from the seeded stream of
/// `ops::ForwardCtx` and has nothing to seed.
pub fn seed_generator(device: &Device, seed: u64) -> Result<()> {
    if !device.is_cpu() {
        device
            .set_seed(seed)
            .context("cannot seed the GPU's random generator")?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize, spec: &str) -> Result<Device> {
    let device =
        Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device `{spec}`"))?;
    if let Device::Cuda(gpu) = &device {
        // cudarc records two events per allocation and per kernel argument so that tensors can
        // move between streams safely; candle runs every operation of a device on that device's
        // one stream (cuBLAS and cuRAND included), and dnatune opens one device per GPU, so stream
        // order already orders every read after its write and every free after its last use.
        // SAFETY: no tensor of this device is used on another stream.
        unsafe { gpu.disable_event_tracking() };
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize, spec: &str) -> Result<Device> {
    Err(anyhow::anyhow!(
        "this dnatune was built without CUDA support; rebuild with `cargo build --release --features cuda` (see the README's CUDA section)"
    ))
    .with_context(|| format!("device `{spec}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_accepted_in_any_case() {
        for spec in ["cpu", "CPU", " cpu "] {
            assert!(parse_device(spec).unwrap().is_cpu());
        }
    }

    #[test]
    fn malformed_names_are_rejected_with_the_accepted_forms() {
        for spec in ["gpu", "cuda:", "cuda:x", "cuda0", "cuda:-1", "metal"] {
            let err = format!("{:#}", parse_device(spec).unwrap_err());
            assert!(err.contains(spec.trim()), "{err}");
            assert!(err.contains("cuda:N"), "{err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        for spec in ["cuda", "cuda:1", "CUDA:0"] {
            let err = format!("{:#}", parse_device(spec).unwrap_err());
            assert!(err.contains("--features cuda"), "{err}");
            assert!(err.contains(spec), "{err}");
        }
    }
}
