//! Decoded frames flow from every rank to rank 0's writer ([`FrameSink`]), in frame order, with
//! host memory that stays flat in the video's length.
//!
//! Each rank decodes its own clip. Rank 0 writes its own frames as it decodes them (its clip comes
//! first in the video), then serves ranks 1, 2, ... in turn: for rank r it grants a credit of at
//! most [`window`] frames with `send_to(r, ..)`, receives exactly that many frames from r (one or
//! more messages), writes them, and grants the next credit until r's clip is done.
//!
//! A rank r > 0 keeps the frames it decoded but has not sent in a queue. It sends queued frames as
//! far as its credit allows; when the queue holds [`window`] frames and no credit is left, it
//! waits for the next credit, and its VAE waits with it. After its last chunk it waits for
//! credits until the queue is empty.
//!
//! Trade-off (decode parallelism vs memory): every rank decodes its first [`window`] frames in
//! parallel with rank 0; the rest of rank r's decoding overlaps only with rank 0 writing r's
//! frames. Decoding is therefore mostly serial across ranks (the VAE is a small part of a
//! generation: one pass per frame against `steps` UNet passes), and in exchange a rank holds at
//! most `window + vae_chunk - 1` decoded frames, rank 0 at most one message of `window` frames
//! (plus what its sink holds), whatever the video's length: memory is flat in frames, linear in
//! the ranks of one process.
//!
//! Wire format (checked on arrival, errors name the rank):
//! * credit, rank 0 -> r: f32 `[1]`, a whole number of frames; 0 is a keep-alive (rank 0 sends
//!   one to a waiting rank at most every quarter of the rank timeout while it serves others, so
//!   a rank waiting its turn does not time out on a long video);
//! * frames, r -> 0: f32 `[n, H, W]`, each pixel packed as `r + 256 g + 65536 b` (a whole number
//!   below 2^24, exact in f32), n at most the credit left.
//!
//! Every wait is a communicator call: bounded by its timeout, failing at once when any rank
//! aborts (a failed sink aborts rank 0, so waiting ranks fail too).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vi_runtime::comm::Communicator;
use vi_runtime::Tensor;

use crate::params::{ModelError, Result};
use crate::pipeline::{Event, Rgb8};

/// Where rank 0 puts the video's frames, in order.
pub trait FrameSink {
    /// Frame `index` of the video (called with 0, 1, 2, ... in turn), RGB8 `[height, width, 3]`.
    fn frame(&mut self, index: usize, rgb: Rgb8) -> Result<()>;
}

/// A rank's bound on frames decoded but not yet sent, below which it never waits for rank 0.
pub const FRAMES_IN_FLIGHT: usize = 16;

/// Frames rank 0 grants a rank at a time, and the queue length at which a rank waits for credit:
/// at least one VAE chunk.
pub fn window(vae_chunk: usize) -> usize {
    vae_chunk.max(FRAMES_IN_FLIGHT)
}

/// The most bytes of decoded frames alive on the host at once for the ranks `local` of a video
/// split into `clips` (frames of `pixels` pixels; the VAE decodes `vae_chunk` at a time), frames
/// in flight and the writer's buffer included (the module doc's flow; tensors on the ranks'
/// devices, such as the VAE's output chunk, are the memory plan's):
/// * each rank r > 0 here: its queue, at most `window + vae_chunk - 1` RGB8 frames (a chunk
///   converted to RGB8 and pushed onto a queue just below the window), at most its clip;
/// * one grant at a time (rank 0 serves one rank): a message of at most `window` frames packed
///   as f32 (4 bytes a pixel), in the mailbox or being sent; on rank 0's process also the RGB8
///   frames unpacked from it;
/// * rank 0 here: its own chunk in RGB8 while it writes it, or the message above; and the sink's
///   buffer: [`FRAMES_IN_FLIGHT`] frames in the channel of `pipeline::generate_to` + the one the
///   writer holds.
///
/// Flat in the video's length: linear in the ranks held, the window and the frame size.
pub fn frames_alive_bytes(
    clips: &[std::ops::Range<usize>],
    local: std::ops::Range<usize>,
    vae_chunk: usize,
    pixels: usize,
) -> u64 {
    let (chunk, window) = (vae_chunk.max(1), window(vae_chunk));
    let rgb = 3 * pixels as u64;
    let packed = 4 * pixels as u64;
    let longest_other = clips.iter().skip(1).map(|c| c.len()).max().unwrap_or(0);
    let grant = window.min(longest_other) as u64;
    let queues: u64 = local
        .clone()
        .filter(|&r| r > 0)
        .map(|r| clips[r].len().min(window + chunk - 1) as u64 * rgb)
        .sum();
    if local.contains(&0) {
        let own = clips[0].len().min(chunk) as u64 * rgb;
        let sink = (FRAMES_IN_FLIGHT + 1) as u64 * rgb;
        queues + own.max(grant * (packed + rgb)) + sink
    } else if local.is_empty() {
        0
    } else {
        queues + grant * packed
    }
}

fn credit_tensor(n: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(vec![n as f32], &[1])?)
}

/// Packs RGB8 frames `[h, w, 3]` into one f32 `[n, h, w]` tensor (module doc).
fn pack(frames: &[Rgb8], h: usize, w: usize) -> Result<Tensor> {
    let mut v = Vec::with_capacity(frames.len() * h * w);
    for f in frames {
        v.extend(
            f.chunks_exact(3)
                .map(|p| (p[0] as u32 | (p[1] as u32) << 8 | (p[2] as u32) << 16) as f32),
        );
    }
    Ok(Tensor::from_vec(v, &[frames.len(), h, w])?)
}

/// Unpacks a frames message from `src` holding at most `max` frames of `h` x `w`.
fn unpack(t: &Tensor, src: usize, max: usize, h: usize, w: usize) -> Result<Vec<Rgb8>> {
    let bad = |what: String| ModelError::Msg(format!("rank 0: frames from rank {src}: {what}"));
    let s = t.shape();
    if s.len() != 3 || s[1] != h || s[2] != w || s[0] == 0 || s[0] > max {
        return Err(bad(format!(
            "shape {s:?}, expected [1..={max}, {h}, {w}] (packed RGB8)"
        )));
    }
    // A host tensor is read in place; one on a device is copied over first.
    let (held, copied);
    let v: &[f32] = match t.as_cpu_f32() {
        Ok(v) => {
            held = v;
            &held
        }
        Err(_) => {
            copied = t.to_vec_f32()?;
            &copied[..]
        }
    };
    let mut out = Vec::with_capacity(s[0]);
    for f in v.chunks_exact(h * w) {
        let mut rgb = Vec::with_capacity(h * w * 3);
        for &p in f {
            if !(0.0..16_777_216.0).contains(&p) || p.fract() != 0.0 {
                return Err(bad(format!("{p} is not a packed RGB8 pixel")));
            }
            let p = p as u32;
            rgb.extend([p as u8, (p >> 8) as u8, (p >> 16) as u8]);
        }
        out.push(rgb);
    }
    Ok(out)
}

/// Reads a credit message from rank 0 (0: keep-alive).
fn read_credit(t: &Tensor, rank: usize) -> Result<usize> {
    let v = t.to_vec_f32()?;
    match v.as_slice() {
        [c] if *c >= 0.0 && c.fract() == 0.0 && *c <= u32::MAX as f32 => Ok(*c as usize),
        _ => Err(ModelError::Msg(format!(
            "rank {rank}: a credit from rank 0 must be one whole number, got shape {:?}",
            t.shape()
        ))),
    }
}

/// Rank r > 0's side: queues decoded frames and sends them to rank 0 as credit allows.
pub(crate) struct FrameSender<'a> {
    comm: &'a dyn Communicator,
    window: usize,
    h: usize,
    w: usize,
    queue: VecDeque<Rgb8>,
    credit: usize,
}

impl<'a> FrameSender<'a> {
    pub(crate) fn new(comm: &'a dyn Communicator, vae_chunk: usize, h: usize, w: usize) -> Self {
        FrameSender {
            comm,
            window: window(vae_chunk),
            h,
            w,
            queue: VecDeque::new(),
            credit: 0,
        }
    }

    /// Queues a decoded chunk; sends what the credit allows and waits for credit while the queue
    /// is full.
    pub(crate) fn push(&mut self, frames: Vec<Rgb8>) -> Result<()> {
        self.queue.extend(frames);
        loop {
            self.send_credited()?;
            if self.queue.len() < self.window {
                return Ok(());
            }
            self.wait_credit()?;
        }
    }

    /// After the last chunk: sends every queued frame (waiting for credit as needed).
    pub(crate) fn finish(&mut self) -> Result<()> {
        loop {
            self.send_credited()?;
            if self.queue.is_empty() {
                return Ok(());
            }
            self.wait_credit()?;
        }
    }

    fn send_credited(&mut self) -> Result<()> {
        let n = self.credit.min(self.queue.len());
        if n == 0 {
            return Ok(());
        }
        let batch: Vec<Rgb8> = self.queue.drain(..n).collect();
        let packed = pack(&batch, self.h, self.w)?;
        drop(batch);
        self.comm.send_to(0, &packed)?;
        self.credit -= n;
        Ok(())
    }

    fn wait_credit(&mut self) -> Result<()> {
        let rank = self.comm.rank();
        while self.credit == 0 {
            self.credit = read_credit(&self.comm.recv_from(0)?, rank)?;
        }
        Ok(())
    }
}

/// Rank 0's side: writes frames in order to the sink (or drops them when there is none) and
/// serves the other ranks in turn.
pub(crate) struct FrameWriter<'a> {
    comm: &'a dyn Communicator,
    sink: Option<&'a mut dyn FrameSink>,
    progress: &'a (dyn Fn(Event) + Sync),
    window: usize,
    h: usize,
    w: usize,
    /// Index of the next frame to write.
    next: usize,
    /// The rank whose frames are being written (0: rank 0's own).
    serving: usize,
    keepalive_every: Duration,
    /// Per rank: when it was last sent a credit or keep-alive.
    last_sent: Vec<Instant>,
}

impl<'a> FrameWriter<'a> {
    pub(crate) fn new(
        comm: &'a dyn Communicator,
        sink: Option<&'a mut dyn FrameSink>,
        progress: &'a (dyn Fn(Event) + Sync),
        vae_chunk: usize,
        (h, w): (usize, usize),
        rank_timeout: Duration,
    ) -> Self {
        FrameWriter {
            comm,
            sink,
            progress,
            window: window(vae_chunk),
            h,
            w,
            next: 0,
            serving: 0,
            keepalive_every: rank_timeout / 4,
            last_sent: vec![Instant::now(); comm.world_size()],
        }
    }

    /// Writes rank 0's own frames, as decoded (its clip starts the video).
    pub(crate) fn write_own(&mut self, frames: Vec<Rgb8>) -> Result<()> {
        self.keep_alive()?;
        self.write(frames)
    }

    /// Writes frames in order; a slow sink keeps the waiting ranks alive between frames.
    fn write(&mut self, frames: Vec<Rgb8>) -> Result<()> {
        for rgb in frames {
            if let Some(s) = self.sink.as_mut() {
                s.frame(self.next, rgb)?;
            }
            self.next += 1;
            (self.progress)(Event::Written { frames: self.next });
            self.keep_alive()?;
        }
        Ok(())
    }

    /// Receives and writes rank `r`'s `frames` frames, granting credit a window at a time.
    pub(crate) fn serve(&mut self, r: usize, frames: usize) -> Result<()> {
        self.serving = r;
        let mut left = frames;
        while left > 0 {
            let grant = self.window.min(left);
            self.comm.send_to(r, &credit_tensor(grant)?)?;
            self.last_sent[r] = Instant::now();
            let mut got = 0;
            while got < grant {
                let t = self.comm.recv_from(r)?;
                let batch = unpack(&t, r, grant - got, self.h, self.w)?;
                drop(t);
                got += batch.len();
                self.write(batch)?;
            }
            left -= grant;
        }
        Ok(())
    }

    /// Sends a keep-alive to every rank after the one being served (ranks still waiting for their
    /// turn; the ranks before have sent everything and may be gone) that has not heard from rank
    /// 0 for a quarter of the rank timeout.
    fn keep_alive(&mut self) -> Result<()> {
        for q in self.serving + 1..self.last_sent.len() {
            if self.last_sent[q].elapsed() >= self.keepalive_every {
                self.comm.send_to(q, &credit_tensor(0)?)?;
                self.last_sent[q] = Instant::now();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distributed::{run_ranks, run_ranks_detailed, split_frames};

    /// A synthetic 2x2 frame that encodes its index.
    fn synthetic(i: usize) -> Rgb8 {
        (0..12).map(|k| (i * 7 + k * 31) as u8).collect()
    }

    /// Collects the frames, taking `.1` per frame (a slow encoder).
    struct Collect(Vec<Rgb8>, Duration);
    impl FrameSink for Collect {
        fn frame(&mut self, index: usize, rgb: Rgb8) -> Result<()> {
            assert_eq!(index, self.0.len(), "frames in order");
            std::thread::sleep(self.1);
            self.0.push(rgb);
            Ok(())
        }
    }

    /// Rank `rank` "decodes" its clip in chunks of `chunk` through the flow (rank 0 collects);
    /// `fail`: (rank, frames) after which that rank errors. Returns rank 0's frames, and for
    /// other ranks the longest queue they held.
    fn flow_rank(
        comm: &dyn Communicator,
        clips: &[std::ops::Range<usize>],
        chunk: usize,
        fail: Option<(usize, usize)>,
        (per_frame, timeout): (Duration, Duration),
    ) -> Result<(Vec<Rgb8>, usize)> {
        let rank = comm.rank();
        let ids: Vec<usize> = clips[rank].clone().collect();
        let chunks = ids
            .chunks(chunk)
            .map(|c| c.iter().map(|&i| synthetic(i)).collect::<Vec<_>>());
        let check_fail = |done: usize| match fail {
            Some((r, at)) if r == rank && done >= at => {
                Err(ModelError::Msg(format!("rank {rank} failed on purpose")))
            }
            _ => Ok(()),
        };
        let mut done = 0;
        if rank == 0 {
            let mut sink = Collect(Vec::new(), per_frame);
            let progress = |_: Event| {};
            let mut w = FrameWriter::new(comm, Some(&mut sink), &progress, chunk, (2, 2), timeout);
            for c in chunks {
                done += c.len();
                w.write_own(c)?;
                check_fail(done)?;
            }
            for (r, c) in clips.iter().enumerate().skip(1) {
                w.serve(r, c.len())?;
            }
            drop(w);
            Ok((sink.0, 0))
        } else {
            let mut s = FrameSender::new(comm, chunk, 2, 2);
            let mut longest = 0;
            for c in chunks {
                done += c.len();
                s.push(c)?;
                longest = longest.max(s.queue.len());
                check_fail(done)?;
            }
            s.finish()?;
            Ok((Vec::new(), longest))
        }
    }

    /// No sink delay, a 20 s group timeout.
    const FAST: (Duration, Duration) = (Duration::ZERO, Duration::from_secs(20));

    #[test]
    fn frames_arrive_in_order_with_bounded_queues() {
        for (frames, world, chunk) in [(157, 4, 3), (10, 3, 1), (64, 2, 20), (5, 5, 2)] {
            let clips = split_frames(frames, world).unwrap();
            let out = run_ranks(world, Duration::from_secs(20), |_, comm| {
                flow_rank(comm, &clips, chunk, None, FAST)
            })
            .unwrap();
            let want: Vec<Rgb8> = (0..frames).map(synthetic).collect();
            assert_eq!(
                out[0].0, want,
                "{frames} frames on {world} ranks, chunk {chunk}"
            );
            // A rank waits with a full window: it never queues a window's worth plus a chunk.
            for (r, (_, l)) in out.iter().enumerate().skip(1) {
                assert!(
                    *l < window(chunk) + chunk,
                    "rank {r} queued {l} frames (window {}, chunk {chunk})",
                    window(chunk)
                );
            }
        }
    }

    #[test]
    fn a_failing_rank_stops_the_flow_everywhere() {
        // A sender dies mid-clip while rank 0 waits for it or serves another; rank 0 dies while
        // the others wait for credit. Every rank still in the flow returns the group's abort, naming the failure,
        // long before the 20 s timeout (a hang would end in a timeout error instead).
        let clips = split_frames(157, 4).unwrap();
        for fail in [(2, 20), (0, 10), (3, 1), (1, 39)] {
            let res = run_ranks_detailed(4, Duration::from_secs(20), |_, comm| {
                flow_rank(comm, &clips, 3, Some(fail), FAST)
            });
            // Ranks before the failing one (but rank 0) may have sent their whole clip already.
            for (r, out) in res.per_rank.iter().enumerate() {
                if r != 0 && r < fail.0 && out.is_ok() {
                    continue;
                }
                let e = out
                    .as_ref()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                assert!(
                    e.contains(&format!("rank {} failed on purpose", fail.0)),
                    "fail {fail:?}: rank {r}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn waiting_ranks_outlive_the_timeout_through_keep_alives() {
        // Rank 0 writes 15 ms per frame: rank 3 waits for its turn about 1.35 s (ranks 0..2's 90
        // frames), past the 1 s timeout; keep-alives every 0.25 s keep it waiting.
        let (frames, world, timeout) = (120, 4, Duration::from_secs(1));
        let clips = split_frames(frames, world).unwrap();
        let out = run_ranks(world, timeout, |_, comm| {
            flow_rank(comm, &clips, 3, None, (Duration::from_millis(15), timeout))
        })
        .unwrap();
        assert_eq!(out[0].0, (0..frames).map(synthetic).collect::<Vec<_>>());
    }

    #[test]
    fn pack_round_trip_is_exact() {
        let frames: Vec<Rgb8> = vec![
            (0..12).map(|i| (i * 23) as u8).collect(),
            vec![255, 0, 255, 0, 255, 0, 1, 128, 254, 255, 255, 255],
        ];
        let t = pack(&frames, 2, 2).unwrap();
        assert_eq!(t.shape(), &[2, 2, 2]);
        assert_eq!(unpack(&t, 1, 2, 2, 2).unwrap(), frames);
        let e = unpack(&t, 3, 1, 2, 2).unwrap_err().to_string();
        assert!(e.contains("rank 3") && e.contains("[2, 2, 2]"), "{e}");
        let bad = Tensor::from_vec(vec![0.5, 0.0, 0.0, 0.0], &[1, 2, 2]).unwrap();
        let e = unpack(&bad, 2, 1, 2, 2).unwrap_err().to_string();
        assert!(e.contains("0.5 is not a packed RGB8 pixel"), "{e}");
    }
}
