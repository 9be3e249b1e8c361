//! vi-model: VideoCrafter2 (UNet3D with fps conditioning, CLIP text encoder + BPE tokenizer, VAE
//! decoder), the samplers, and Video-Infinity's clip parallelism. One model code path over the op
//! vocabulary of `vi-runtime`; the model never branches on the device.

pub mod checkpoint;
pub mod clip;
pub mod clip_parallel;
pub mod convert;
pub mod distributed;
pub mod frame_flow;
pub mod layers;
pub mod limits;
pub mod memory_plan;
pub mod models;
pub mod params;
pub mod pipeline;
pub mod random_full;
pub mod rank_loop;
pub mod request_digest;
pub mod sampler;
pub mod schedule;
pub mod temporal;
pub mod tiny;
pub mod tokenizer;
pub mod unet;
pub mod vae;
