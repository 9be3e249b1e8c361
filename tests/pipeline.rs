//! `vi_model::pipeline::generate` against a straightforward re-implementation written here: the
//! embedded tiny model, text encoder run per prompt, the UNet run separately on the unconditional
//! and the conditional branch (batch 1 each, not the CFG batch), guidance combined on the host as
//! g cond + (1 - g) uncond (= uncond + g (cond - uncond), diffusers' rule), the sampler stepped with the documented per-frame noise, each clip
//! decoded by the VAE and rounded to RGB8. Frames must agree within 1/255 everywhere.

use std::time::Duration;

use vi_model::clip_parallel::{ClipParallelContext, ViConfig};
use vi_model::distributed::{run_ranks, split_frames};
use vi_model::pipeline::{frame_noise, generate, GenerateRequest};
use vi_model::sampler::{Sampler, SamplerKind, SamplerState};
use vi_model::tiny;
use vi_runtime::{ops, DType, Device, Tensor};

fn request(world: usize, sampler: SamplerKind) -> GenerateRequest {
    GenerateRequest {
        prompts: vec![(0, "a cat on a skateboard".into()), (3, "a dog".into())],
        negative_prompt: "blurry".into(),
        frames: 5,
        height: 64,
        width: 64,
        steps: 3,
        sampler,
        guidance: 7.5,
        fps_cond: 24.0,
        seed: 11,
        vi: ViConfig::default(),
        world,
        rank_timeout: Duration::from_secs(120),
        comm: Default::default(),
        vae_chunk: 2,
        decode: true,
        schedule: vi_model::schedule::Schedule::UNCONSTRAINED,
        offload_dir: None,
    }
}

fn reference(req: &GenerateRequest) -> Vec<Vec<u8>> {
    let m = tiny::load(Device::Cpu, DType::F32).unwrap();
    let enc = |p: &str| m.clip.forward(&m.tokenizer.encode(p), 1).unwrap();
    let uncond = enc(&req.negative_prompt);
    let clips = split_frames(req.frames, req.world).unwrap();
    let sampler = Sampler::new(req.sampler, req.steps).unwrap();
    let (h, w, c) = (req.height / 8, req.width / 8, 4);
    let g = req.guidance;
    let per_rank = run_ranks(req.world, req.rank_timeout, |r, comm| {
        let clip = clips[r].clone();
        let n = clip.len();
        // The segment holding the clip's first frame.
        let prompt = &req
            .prompts
            .iter()
            .rev()
            .find(|(f, _)| *f <= clip.start)
            .unwrap()
            .1;
        let cond = enc(prompt);
        let shape = [1, n, h, w, c];
        let mut x =
            Tensor::from_vec(frame_noise(req.seed, 0, clip.clone(), h, w, c), &shape).unwrap();
        let mut state = SamplerState::default();
        for (k, &t) in sampler.timesteps().iter().enumerate() {
            let ctx = ClipParallelContext::new(comm, &req.vi, t);
            let eu = m.unet.forward(&x, t as f32, req.fps_cond, &uncond, &ctx)?;
            let ec = m.unet.forward(&x, t as f32, req.fps_cond, &cond, &ctx)?;
            let (eu, ec) = (eu.to_vec_f32()?, ec.to_vec_f32()?);
            let eps: Vec<f32> = eu
                .iter()
                .zip(&ec)
                .map(|(&u, &c)| g * c + (1.0 - g) * u)
                .collect();
            let eps = Tensor::from_vec(eps, &shape)?;
            let noise = sampler.needs_noise().then(|| {
                Tensor::from_vec(
                    frame_noise(req.seed, k as u64 + 1, clip.clone(), h, w, c),
                    &shape,
                )
                .unwrap()
            });
            x = sampler.step(&mut state, k, &eps, &x, noise.as_ref())?;
        }
        let img = m.vae.decode(&x.reshape(&[n, h, w, c])?)?;
        let img = ops::clamp(&ops::affine(&img, 0.5, 0.5)?, 0.0, 1.0)?.to_vec_f32()?;
        let per = img.len() / n;
        Ok(img
            .chunks(per)
            .map(|f| f.iter().map(|&v| (v * 255.0).round() as u8).collect())
            .collect::<Vec<Vec<u8>>>())
    })
    .unwrap();
    per_rank.into_iter().flatten().collect()
}

fn check(world: usize, sampler: SamplerKind) {
    let req = request(world, sampler);
    let m = tiny::load(Device::Cpu, DType::F32).unwrap();
    let got = generate(&|_| &m, &req, &|_| {}).unwrap();
    let want = reference(&req);
    assert_eq!(got.len(), req.frames);
    assert_eq!(want.len(), req.frames);
    let mut worst = 0i32;
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a.len(), 64 * 64 * 3, "frame {i}");
        for (&x, &y) in a.iter().zip(b) {
            worst = worst.max((x as i32 - y as i32).abs());
        }
    }
    assert!(
        worst <= 1,
        "W={world} {sampler:?}: frames differ by up to {worst}/255"
    );
    // Not a degenerate video.
    assert!(got[0].iter().max() > got[0].iter().min());
}

#[test]
fn pipeline_matches_reference_loop_two_ranks_sde() {
    check(2, SamplerKind::DpmSolverSde);
}

#[test]
fn pipeline_matches_reference_loop_one_rank_ddim() {
    check(1, SamplerKind::Ddim);
}

/// The overlapped exchange schedule (the default) and the synchronous one make the same video,
/// bit for bit, in the reference and the exact-seam modes.
#[test]
fn overlapped_and_synchronous_schedules_make_the_same_video() {
    let m = tiny::load(Device::Cpu, DType::F32).unwrap();
    for exact_seam in [false, true] {
        let video = |overlap: bool| {
            let mut req = request(3, SamplerKind::DpmSolverSde);
            req.frames = 9;
            req.steps = 2;
            req.vi = ViConfig {
                exact_seam,
                overlap,
                attn_pad: 2,
                top_k: 4,
                ..ViConfig::default()
            };
            generate(&|_| &m, &req, &|_| {}).unwrap()
        };
        let (sync, overlapped) = (video(false), video(true));
        assert_eq!(sync.len(), 9);
        assert!(sync == overlapped, "exact_seam={exact_seam}: videos differ");
    }
}
