//! Writing frames: H.264 in MP4 (openh264 encoder + the `mp4` muxer) and PNG sequences.
//!
//! Every output is written under a temporary name in the destination's own folder
//! ([`crate::outputs`]) and renamed into place only when complete, so a failed or interrupted run
//! never leaves a truncated file under the requested name and never destroys an existing one.
//! Opening a writer checks the destination (kind, folder, writability) before any expensive work;
//! the temporary file or folder itself is created only when the first frame arrives.

use std::fs::{self, File};
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode, UsageType,
};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

pub use crate::outputs::{check_destination, AtomicFile};
use crate::outputs::{check_dir_destination, StagedDir};

/// One RGB frame, 8 bits per channel, rows top to bottom, `rgb.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Frame {
    pub fn new(width: usize, height: usize, rgb: Vec<u8>) -> Result<Frame> {
        ensure!(
            rgb.len() == width * height * 3,
            "frame buffer holds {} bytes, {width}x{height} RGB needs {}",
            rgb.len(),
            width * height * 3
        );
        Ok(Frame { width, height, rgb })
    }
}

/// Streams frames into an H.264 MP4 file: `push` each frame, then `finish`.
///
/// Container: `ftyp` (isom, iso2, avc1, mp41), one video track, `avc1` sample entry whose `avcC`
/// holds the encoder's SPS and PPS; samples are the frame's NAL units with 4-byte length prefixes
/// (parameter sets removed from the samples). Timescale `1000 * fps`, each sample lasts 1000
/// ticks, so durations are exact for any integer fps; movie and track durations agree.
pub struct Mp4Writer {
    dest: PathBuf,
    overwrite: bool,
    /// The temporary file, created with the first frame.
    out: Option<AtomicFile>,
    width: usize,
    height: usize,
    fps: u32,
    encoder: Encoder,
    /// Muxer, started on the first frame (it needs the SPS/PPS for the sample entry).
    mux: Option<mp4::Mp4Writer<BufWriter<File>>>,
    sps: Vec<u8>,
    pps: Vec<u8>,
    frames: u64,
}

/// Samples per second of the track's time base per frame.
const TICKS_PER_FRAME: u32 = 1000;

impl Mp4Writer {
    /// Checks `dest` now (so a bad destination fails before any work); the temporary file is
    /// created by the first [`Mp4Writer::push`].
    /// `width`, `height` must be even (4:2:0 chroma); `fps >= 1`.
    pub fn create(
        dest: &Path,
        width: usize,
        height: usize,
        fps: u32,
        overwrite: bool,
    ) -> Result<Mp4Writer> {
        ensure!(
            width >= 16 && height >= 16 && width.is_multiple_of(2) && height.is_multiple_of(2),
            "MP4 output needs an even width and height of at least 16, got {width}x{height}"
        );
        ensure!(
            width <= u16::MAX as usize && height <= u16::MAX as usize,
            "frame size {width}x{height} too large for MP4"
        );
        ensure!(fps >= 1, "output fps must be at least 1");
        check_destination(dest, overwrite)?;
        // Rate control off (constant QP, openh264's default 26: good quality for generated
        // video), no frame skipping (every frame we push must come out), one IDR every 2 seconds
        // so players can seek.
        let bps = (width * height * fps as usize * 2).clamp(500_000, u32::MAX as usize) as u32;
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(bps))
            .max_frame_rate(FrameRate::from_hz(fps as f32))
            .rate_control_mode(RateControlMode::Off)
            .usage_type(UsageType::CameraVideoRealTime)
            .debug(false)
            .skip_frames(false)
            .intra_frame_period(IntraFramePeriod::from_num_frames(2 * fps));
        let encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .context("cannot start the H.264 encoder")?;
        Ok(Mp4Writer {
            dest: dest.to_path_buf(),
            overwrite,
            out: None,
            width,
            height,
            fps,
            encoder,
            mux: None,
            sps: Vec::new(),
            pps: Vec::new(),
            frames: 0,
        })
    }

    /// Encodes and appends one frame.
    pub fn push(&mut self, frame: &Frame) -> Result<()> {
        ensure!(
            frame.width == self.width && frame.height == self.height,
            "frame {} is {}x{}, the video is {}x{}",
            self.frames,
            frame.width,
            frame.height,
            self.width,
            self.height
        );
        let yuv =
            YUVBuffer::from_rgb8_source(RgbSliceU8::new(&frame.rgb, (self.width, self.height)));
        let bitstream = self
            .encoder
            .encode(&yuv)
            .with_context(|| format!("H.264 encoding failed at frame {}", self.frames))?;
        // Split into NAL units: parameter sets go to avcC, the rest into the sample.
        let mut sample = Vec::new();
        let mut is_idr = false;
        for li in 0..bitstream.num_layers() {
            let layer = bitstream.layer(li).expect("layer index in range");
            for ni in 0..layer.nal_count() {
                let nal = strip_start_code(layer.nal_unit(ni).expect("nal index in range"));
                if nal.is_empty() {
                    continue;
                }
                match nal[0] & 0x1f {
                    7 => {
                        if self.sps.is_empty() {
                            self.sps = nal.to_vec();
                        } else {
                            ensure!(
                                self.sps == nal,
                                "the H.264 encoder changed its SPS mid-stream"
                            );
                        }
                    }
                    8 => {
                        if self.pps.is_empty() {
                            self.pps = nal.to_vec();
                        } else {
                            ensure!(
                                self.pps == nal,
                                "the H.264 encoder changed its PPS mid-stream"
                            );
                        }
                    }
                    t => {
                        if t == 5 {
                            is_idr = true;
                        }
                        sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        sample.extend_from_slice(nal);
                    }
                }
            }
        }
        ensure!(
            !sample.is_empty(),
            "the H.264 encoder produced no picture for frame {}",
            self.frames
        );
        if self.mux.is_none() {
            ensure!(
                is_idr && !self.sps.is_empty() && !self.pps.is_empty(),
                "the H.264 stream does not start with SPS, PPS and an IDR picture"
            );
            self.start_mux()?;
        }
        let mux = self.mux.as_mut().expect("started above");
        mux.write_sample(
            1,
            &mp4::Mp4Sample {
                start_time: self.frames * TICKS_PER_FRAME as u64,
                duration: TICKS_PER_FRAME,
                rendering_offset: 0,
                is_sync: is_idr,
                bytes: sample.into(),
            },
        )
        .map_err(|e| mp4_error(e, &self.dest))?;
        self.frames += 1;
        Ok(())
    }

    fn start_mux(&mut self) -> Result<()> {
        let timescale = TICKS_PER_FRAME * self.fps;
        let out = AtomicFile::create(&self.dest, self.overwrite)?;
        let file = out
            .file_ref()
            .try_clone()
            .with_context(|| format!("cannot write {}", self.dest.display()))?;
        self.out = Some(out);
        let config = mp4::Mp4Config {
            major_brand: "isom".parse().expect("fourcc"),
            minor_version: 512,
            compatible_brands: ["isom", "iso2", "avc1", "mp41"]
                .iter()
                .map(|b| b.parse().expect("fourcc"))
                .collect(),
            timescale,
        };
        let mut mux = mp4::Mp4Writer::write_start(BufWriter::new(file), &config)
            .map_err(|e| mp4_error(e, &self.dest))?;
        mux.add_track(&mp4::TrackConfig {
            track_type: mp4::TrackType::Video,
            timescale,
            language: "und".into(),
            media_conf: mp4::MediaConfig::AvcConfig(mp4::AvcConfig {
                width: self.width as u16,
                height: self.height as u16,
                seq_param_set: self.sps.clone(),
                pic_param_set: self.pps.clone(),
            }),
        })
        .map_err(|e| mp4_error(e, &self.dest))?;
        self.mux = Some(mux);
        Ok(())
    }

    pub fn frames_written(&self) -> u64 {
        self.frames
    }

    /// Writes the index (`moov`), flushes, and renames the file onto its destination.
    pub fn finish(mut self) -> Result<()> {
        ensure!(self.frames > 0, "no frames to write");
        let cannot = || format!("cannot write {}", self.dest.display());
        let mut mux = self.mux.take().expect("frames > 0 implies started");
        mux.write_end().map_err(|e| mp4_error(e, &self.dest))?;
        let mut w = mux.into_writer();
        w.flush().with_context(cannot)?;
        let mut f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(cannot)?;
        // The muxer seeks back to patch sizes; make sure the file ends where the moov ends.
        let end = f.stream_position().with_context(cannot)?;
        f.set_len(end).with_context(cannot)?;
        self.out
            .take()
            .expect("started with the first frame")
            .commit()
    }
}

/// An `mp4` crate error as `cannot write DEST: <cause>`, the OS error stated once (the crate's
/// I/O variant displays its source and also returns it as its source).
fn mp4_error(e: mp4::Error, dest: &Path) -> anyhow::Error {
    let cannot = format!("cannot write {}", dest.display());
    match e {
        mp4::Error::IoError(io) => anyhow::Error::new(io).context(cannot),
        other => anyhow::anyhow!("{other}").context(cannot),
    }
}

/// Removes an Annex-B start code (00 00 01 or 00 00 00 01) from the front of a NAL unit.
fn strip_start_code(nal: &[u8]) -> &[u8] {
    let zeros = nal.iter().take_while(|&&b| b == 0).count();
    if zeros >= 2 && nal.get(zeros) == Some(&1) {
        &nal[zeros + 1..]
    } else {
        nal
    }
}

/// Encodes one frame as PNG (RGB8) into `w`.
pub fn encode_png(frame: &Frame, w: impl Write) -> Result<()> {
    let mut enc = png::Encoder::new(w, frame.width as u32, frame.height as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(png_error)?;
    writer.write_image_data(&frame.rgb).map_err(png_error)?;
    writer.finish().map_err(png_error)?;
    Ok(())
}

/// A `png` crate error, the OS error stated once (its I/O variant displays its source and also
/// returns it as its source).
fn png_error(e: png::EncodingError) -> anyhow::Error {
    match e {
        png::EncodingError::IoError(io) => io.into(),
        other => anyhow::anyhow!("PNG encoding failed: {other}"),
    }
}

/// Writes frames as `DIR/frame_00000.png`, ... : into a temporary folder (created with the
/// first frame) that [`PngSequence::finish`] puts into place; with `overwrite`, the
/// `frame_*.png` files of an earlier run that the new frames do not replace are removed then, so
/// the folder holds exactly the new frames. Dropped unfinished, nothing is left behind and an
/// earlier run's frames are untouched.
pub struct PngSequence {
    dir: PathBuf,
    overwrite: bool,
    next: usize,
    stage: Option<StagedDir>,
}

/// The file name of frame `i` in a PNG sequence.
pub fn png_name(i: usize) -> String {
    format!("frame_{i:05}.png")
}

/// Whether `name` is a frame file name of a PNG sequence (`frame_<digits>.png`).
fn is_png_name(name: &str) -> bool {
    name.strip_prefix("frame_")
        .and_then(|r| r.strip_suffix(".png"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

impl PngSequence {
    /// Checks `dir` now: absent (created when finished), or a folder that holds no `frame_*.png`
    /// unless `overwrite` (and then only regular files or links by those names); writable.
    pub fn create(dir: &Path, overwrite: bool) -> Result<PngSequence> {
        check_dir_destination(dir)?;
        if dir.is_dir() {
            for e in fs::read_dir(dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .filter_map(|e| e.ok())
            {
                let n = e.file_name().to_string_lossy().into_owned();
                if !is_png_name(&n) {
                    continue;
                }
                ensure!(
                    overwrite,
                    "{} already holds frame_*.png files (pass --overwrite to replace them)",
                    dir.display()
                );
                let m = fs::symlink_metadata(e.path())
                    .with_context(|| format!("cannot check {}", e.path().display()))?;
                ensure!(
                    m.is_file() || m.file_type().is_symlink(),
                    "{} is {}: --overwrite replaces only regular files",
                    e.path().display(),
                    vi_weights::input_file::kind_of(&m)
                );
            }
        }
        // Probe writability (and the folders on the way) before any work.
        drop(StagedDir::create(dir)?);
        Ok(PngSequence {
            dir: dir.to_path_buf(),
            overwrite,
            next: 0,
            stage: None,
        })
    }

    /// Writes the next frame into the temporary folder; returns its final path.
    pub fn push(&mut self, frame: &Frame) -> Result<PathBuf> {
        if self.stage.is_none() {
            self.stage = Some(StagedDir::create(&self.dir)?);
        }
        let stage = self.stage.as_ref().expect("created above");
        let name = png_name(self.next);
        let final_path = self.dir.join(&name);
        let cannot = || {
            format!(
                "cannot write {} (in the temporary folder {})",
                final_path.display(),
                stage.path().display()
            )
        };
        let f = File::create(stage.path().join(&name)).with_context(cannot)?;
        let mut w = BufWriter::new(f);
        encode_png(frame, &mut w).with_context(cannot)?;
        let f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(cannot)?;
        f.sync_all().with_context(cannot)?;
        self.next += 1;
        Ok(final_path)
    }

    pub fn frames_written(&self) -> usize {
        self.next
    }

    /// Puts the frames into place (see the type's doc). Without frames, nothing is written.
    pub fn finish(mut self) -> Result<()> {
        let Some(stage) = self.stage.take() else {
            return Ok(());
        };
        let (n, overwrite) = (self.next, self.overwrite);
        stage.commit(|dir| {
            if !overwrite {
                return Ok(());
            }
            // Frames of an earlier, longer run.
            for e in fs::read_dir(dir)?.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                // `frame_<digits>.png` other than the new frames 0..n.
                let stale = is_png_name(&name)
                    && !name[6..name.len() - 4]
                        .parse::<usize>()
                        .is_ok_and(|i| i < n && png_name(i) == name)
                    && fs::symlink_metadata(e.path())
                        .is_ok_and(|m| m.is_file() || m.file_type().is_symlink());
                if stale {
                    fs::remove_file(e.path())?;
                }
            }
            Ok(())
        })
    }
}
