//! Samplers: DPM-Solver++ SDE order 2 (Video-Infinity's), deterministic DPM-Solver++ 2M, DDIM (eta 0).
//!
//! Coefficients follow diffusers' `DPMSolverMultistepScheduler` / `DDIMScheduler` with the zeroscope /
//! VideoCrafter2 schedule (scaled_linear betas 0.00085..0.012 over 1000 steps, epsilon prediction),
//! computed in f64 on the host; the update itself is elementwise on tensors of any device and layout
//! (x, eps and noise must share one shape). The SDE sampler's noise is supplied by the caller, so
//! runs are reproducible and each rank can draw its own.

use vi_runtime::{ops, Tensor};

use crate::params::{ModelError, Result};

/// Which sampler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    /// `sde-dpmsolver++`, order 2, midpoint (Video-Infinity's; draws fresh noise every step).
    DpmSolverSde,
    /// Deterministic `dpmsolver++` 2M, midpoint.
    DpmSolver2M,
    /// DDIM, eta 0, "leading" spacing with steps_offset 1 (zeroscope's own).
    Ddim,
}

impl std::str::FromStr for SamplerKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "dpm-sde" | "sde-dpmsolver++" => Ok(SamplerKind::DpmSolverSde),
            "dpm2m" | "dpmsolver++" => Ok(SamplerKind::DpmSolver2M),
            "ddim" => Ok(SamplerKind::Ddim),
            _ => Err(ModelError::Config(format!(
                "unknown sampler `{s}` (expected dpm-sde, dpm2m or ddim)"
            ))),
        }
    }
}

/// The training noise schedule (1000 steps, scaled_linear 0.00085..0.012).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// alpha-bar_t, t = 0..num_train_timesteps-1.
    pub alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    pub fn scaled_linear(beta_start: f64, beta_end: f64, n: usize) -> Self {
        let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
        let mut prod = 1.0;
        let alphas_cumprod = (0..n)
            .map(|i| {
                let s = if n == 1 {
                    a
                } else {
                    a + (b - a) * i as f64 / (n - 1) as f64
                };
                prod *= 1.0 - s * s;
                prod
            })
            .collect();
        NoiseSchedule { alphas_cumprod }
    }

    /// VideoCrafter2 / zeroscope.
    pub fn videocrafter2() -> Self {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }
}

/// A sampler for a fixed number of steps.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub kind: SamplerKind,
    schedule: NoiseSchedule,
    timesteps: Vec<i64>,
    /// DPM: sigma_k = sqrt((1 - abar)/abar) at timesteps[k]; sigma_N = 0.
    sigmas: Vec<f64>,
}

/// Per-rank sampler state carried between steps: the previous step's x0 prediction (f32, the
/// latents' shape), kept by the DPM samplers (second order from the second step on); DDIM keeps
/// nothing. A checkpoint saves it with the latents ([`crate::checkpoint`]).
#[derive(Default, Clone)]
pub struct SamplerState {
    prev_x0: Option<Tensor>,
}

impl SamplerState {
    /// The state as a checkpoint restores it.
    pub fn from_prev_x0(prev_x0: Option<Tensor>) -> Self {
        SamplerState { prev_x0 }
    }

    /// The previous step's x0 prediction (None before the first DPM step and for DDIM).
    pub fn prev_x0(&self) -> Option<&Tensor> {
        self.prev_x0.as_ref()
    }
}

impl Sampler {
    pub fn new(kind: SamplerKind, steps: usize) -> Result<Self> {
        Self::with_schedule(kind, steps, NoiseSchedule::videocrafter2())
    }

    pub fn with_schedule(kind: SamplerKind, steps: usize, schedule: NoiseSchedule) -> Result<Self> {
        let n_train = schedule.alphas_cumprod.len();
        if steps == 0 || steps > n_train {
            return Err(ModelError::Config(format!(
                "steps must be in 1..={n_train}, got {steps}"
            )));
        }
        let (timesteps, sigmas) = match kind {
            SamplerKind::Ddim => {
                // leading spacing + steps_offset 1: (arange(steps) * (n_train / steps))[::-1] + 1
                let ratio = n_train / steps;
                let ts = (0..steps).rev().map(|i| (i * ratio) as i64 + 1).collect();
                (ts, Vec::new())
            }
            SamplerKind::DpmSolverSde | SamplerKind::DpmSolver2M => {
                // np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1]; numpy's linspace is
                // i * ((stop - start) / steps), which rounds e.g. 15 * 33.3 to 499.49999999999994.
                let last = (n_train - 1) as f64;
                let delta = last / steps as f64;
                let ts: Vec<i64> = (0..=steps)
                    .map(|i| {
                        let v = if i == steps { last } else { i as f64 * delta };
                        v.round_ties_even() as i64
                    })
                    .rev()
                    .take(steps)
                    .collect();
                let mut sig: Vec<f64> = ts
                    .iter()
                    .map(|&t| {
                        let a = schedule.alphas_cumprod[t as usize];
                        ((1.0 - a) / a).sqrt()
                    })
                    .collect();
                sig.push(0.0); // final_sigmas_type "zero"
                (ts, sig)
            }
        };
        Ok(Sampler {
            kind,
            schedule,
            timesteps,
            sigmas,
        })
    }

    /// Timesteps in the order they are visited (descending).
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// The initial latents are N(0, 1) times this (1.0 for all three samplers here).
    pub fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// Whether `step` needs a fresh N(0, 1) noise tensor.
    pub fn needs_noise(&self) -> bool {
        self.kind == SamplerKind::DpmSolverSde
    }

    /// alpha_t, sigma_t, lambda_t of DPM step k (k = steps: the final sigma 0).
    fn dpm_coeffs(&self, k: usize) -> (f64, f64, f64) {
        let sigma = self.sigmas[k];
        let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
        let sigma_t = sigma * alpha_t;
        (alpha_t, sigma_t, alpha_t.ln() - sigma_t.ln())
    }

    /// One step k (0-based) from `x` given the model's epsilon prediction `eps` (CFG already applied).
    /// `noise` (N(0,1), same shape) is required by the SDE sampler and ignored otherwise.
    pub fn step(
        &self,
        state: &mut SamplerState,
        k: usize,
        eps: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        if k >= self.timesteps.len() {
            return Err(ModelError::Msg(format!(
                "sampler step {k} out of range ({} steps)",
                self.timesteps.len()
            )));
        }
        if eps.shape() != x.shape() {
            return Err(ModelError::Msg(format!(
                "sampler: eps {:?} and sample {:?} differ in shape",
                eps.shape(),
                x.shape()
            )));
        }
        match self.kind {
            SamplerKind::Ddim => self.ddim_step(k, eps, x),
            _ => self.dpm_step(state, k, eps, x, noise),
        }
    }

    fn ddim_step(&self, k: usize, eps: &Tensor, x: &Tensor) -> Result<Tensor> {
        let ac = &self.schedule.alphas_cumprod;
        let n_train = ac.len() as i64;
        let t = self.timesteps[k];
        let prev = t - n_train / self.timesteps.len() as i64;
        let a_t = ac[t as usize];
        // set_alpha_to_one = false: the final "previous" alpha is alphas_cumprod[0].
        let a_prev = if prev >= 0 { ac[prev as usize] } else { ac[0] };
        // x0 = (x - sqrt(1-a_t) eps)/sqrt(a_t); x' = sqrt(a_prev) x0 + sqrt(1-a_prev) eps
        // => x' = c_x x + c_e eps
        let c_x = (a_prev / a_t).sqrt();
        let c_e = (1.0 - a_prev).sqrt() - (a_prev / a_t).sqrt() * (1.0 - a_t).sqrt();
        lin2(x, c_x, eps, c_e)
    }

    fn dpm_step(
        &self,
        state: &mut SamplerState,
        k: usize,
        eps: &Tensor,
        x: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let n = self.timesteps.len();
        let (alpha_s, sigma_s, lambda_s) = self.dpm_coeffs(k);
        let (alpha_t, sigma_t, lambda_t) = self.dpm_coeffs(k + 1);
        // x0 prediction from epsilon.
        let x0 = lin2(x, 1.0 / alpha_s, eps, -sigma_s / alpha_s)?;
        let h = lambda_t - lambda_s;
        // First order at the first step (no history) and at the last step (final sigma 0).
        let first_order = k == 0 || k == n - 1 || state.prev_x0.is_none();
        // Combined x0 term: D0 + 0.5 D1 with D1 = (x0 - prev_x0) / r0 (second order), else x0.
        let d = if first_order {
            x0.clone()
        } else {
            let (_, _, lambda_prev) = self.dpm_coeffs(k - 1);
            let r0 = (lambda_s - lambda_prev) / h;
            let prev = state.prev_x0.as_ref().expect("checked above");
            lin2(&x0, 1.0 + 0.5 / r0, prev, -0.5 / r0)?
        };
        let out = match self.kind {
            SamplerKind::DpmSolver2M => {
                // x' = (s'/s) x - alpha' (e^-h - 1) D
                lin2(x, sigma_t / sigma_s, &d, -alpha_t * ((-h).exp() - 1.0))?
            }
            SamplerKind::DpmSolverSde => {
                // x' = (s'/s) e^-h x + alpha' (1 - e^-2h) D + s' sqrt(1 - e^-2h) z
                let det = lin2(
                    x,
                    sigma_t / sigma_s * (-h).exp(),
                    &d,
                    alpha_t * (1.0 - (-2.0 * h).exp()),
                )?;
                let c_z = sigma_t * (1.0 - (-2.0 * h).exp()).max(0.0).sqrt();
                if c_z == 0.0 {
                    det
                } else {
                    let z = noise.ok_or_else(|| {
                        ModelError::Msg("the SDE sampler needs a noise tensor at every step".into())
                    })?;
                    if z.shape() != x.shape() {
                        return Err(ModelError::Msg(format!(
                            "sampler: noise {:?} and sample {:?} differ in shape",
                            z.shape(),
                            x.shape()
                        )));
                    }
                    ops::add(&det, &ops::scale(z, c_z as f32)?)?
                }
            }
            SamplerKind::Ddim => unreachable!("handled by ddim_step"),
        };
        state.prev_x0 = Some(x0);
        Ok(out)
    }
}

/// a * x + b * y, elementwise (coefficients rounded to f32).
fn lin2(x: &Tensor, a: f64, y: &Tensor, b: f64) -> Result<Tensor> {
    Ok(ops::add(
        &ops::scale(x, a as f32)?,
        &ops::scale(y, b as f32)?,
    )?)
}
