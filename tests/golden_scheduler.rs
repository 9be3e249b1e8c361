//! The three samplers against diffusers' trajectories (golden `scheduler_*.safetensors`): timesteps
//! exactly, and every step's `prev_sample` within atol 2e-4 + rtol 1e-5 and rel L2 1e-5 (golden
//! README), both along the whole trajectory and restarted from the stored previous sample.

use vi_model::sampler::{Sampler, SamplerKind, SamplerState};
use vi_runtime::testing::assert_close_tensors;
use vi_runtime::{ops, Tensor};
use vi_suite::{golden_dir, GOLDEN_SCHEDULER};
use vi_weights::WeightStore;

fn load(store: &WeightStore, name: &str) -> Tensor {
    let info = store.info(name).unwrap_or_else(|| panic!("{name} missing"));
    let shape = info.shape.clone();
    Tensor::from_vec(store.read_f32(name, None).unwrap(), &shape).unwrap()
}

/// Panics naming `what` unless `got` is within the golden scheduler tolerance; the rel L2.
fn check_close(what: &str, got: &Tensor, want: &Tensor) -> f64 {
    assert_close_tensors(what, got, want, &GOLDEN_SCHEDULER).rel_l2
}

fn run_case(file: &str, kind: SamplerKind) {
    let store = WeightStore::open(golden_dir().join(file)).unwrap();
    let ts = store.read_i64("in/timesteps").unwrap();
    let sampler = Sampler::new(kind, ts.len()).unwrap();
    assert_eq!(sampler.timesteps(), &ts[..], "{file}: timesteps");
    let x_t = load(&store, "in/x_T");
    let shape = x_t.shape().to_vec(); // [b, c, f, h, w]
    let mut x = x_t.clone();
    let mut state = SamplerState::default();
    let mut restart_state = SamplerState::default();
    let mut worst = 0f64;
    for k in 0..ts.len() {
        let eps = load(&store, &format!("in/model_output/step{k}"));
        let noise = if sampler.needs_noise() {
            // Stored in the scheduler's layout [b*f, c, h, w] -> [b, c, f, h, w].
            let z = load(&store, &format!("in/noise/step{k}"));
            let z = z
                .reshape(&[shape[0], shape[2], shape[1], shape[3], shape[4]])
                .unwrap();
            Some(ops::permute(&z, &[0, 2, 1, 3, 4]).unwrap())
        } else {
            None
        };
        let want = load(&store, &format!("out/prev_sample/step{k}"));
        // Restarted from the stored previous sample (isolates one step's error).
        let start = if k == 0 {
            x_t.clone()
        } else {
            load(&store, &format!("out/prev_sample/step{}", k - 1))
        };
        let one = sampler
            .step(&mut restart_state, k, &eps, &start, noise.as_ref())
            .unwrap();
        check_close(&format!("{file} step {k} (restarted)"), &one, &want);
        // Along the whole trajectory.
        x = sampler
            .step(&mut state, k, &eps, &x, noise.as_ref())
            .unwrap();
        worst = worst.max(check_close(&format!("{file} step {k}"), &x, &want));
    }
    eprintln!("{file}: worst rel L2 over the trajectory {worst:.3e}");
}

#[test]
fn dpm_solver_sde_matches_diffusers() {
    run_case(
        "scheduler_sde_dpmpp_30.safetensors",
        SamplerKind::DpmSolverSde,
    );
}

#[test]
fn dpm_solver_2m_matches_diffusers() {
    run_case("scheduler_dpmpp_30.safetensors", SamplerKind::DpmSolver2M);
}

#[test]
fn ddim_matches_diffusers() {
    run_case("scheduler_ddim_50.safetensors", SamplerKind::Ddim);
}

#[test]
fn timesteps_for_other_step_counts() {
    // Video-Infinity's phase split: with 30 steps, 6 steps have t >= 800.
    let s = Sampler::new(SamplerKind::DpmSolverSde, 30).unwrap();
    assert_eq!(s.timesteps().iter().filter(|&&t| t >= 800).count(), 6);
    let s = Sampler::new(SamplerKind::DpmSolver2M, 7).unwrap();
    assert_eq!(s.timesteps().len(), 7);
    assert_eq!(s.timesteps()[0], 999);
    let d = Sampler::new(SamplerKind::Ddim, 25).unwrap();
    assert_eq!(d.timesteps()[0], 961);
    assert_eq!(*d.timesteps().last().unwrap(), 1);
    assert!(Sampler::new(SamplerKind::Ddim, 0).is_err());
}
