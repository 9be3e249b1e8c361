//! Writing frames: H.264 in MP4 (openh264 encoder + the `mp4` muxer) and PNG sequences.
//!
//! Every output is written to a temporary file in the destination's own folder and renamed over
//! the destination only when complete, so a failed or interrupted run never leaves a truncated
//! file under the requested name and never destroys an existing one. The temporary file is
//! created when the writer is opened, i.e. before any expensive work, so an unwritable
//! destination is reported at once.

use std::fs::{self, File};
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, RateControlMode, UsageType,
};
use openh264::formats::{RgbSliceU8, YUVBuffer};
use openh264::OpenH264API;

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

/// Refuses an existing destination unless `overwrite`, and checks its folder exists.
pub fn check_destination(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        bail!(
            "{} already exists (pass --overwrite to replace it)",
            path.display()
        );
    }
    if path.is_dir() {
        bail!("{} is a directory, expected a file name", path.display());
    }
    let parent = parent_dir(path);
    ensure!(
        parent.is_dir(),
        "cannot write {}: folder {} does not exist",
        path.display(),
        parent.display()
    );
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary file beside `dest`, renamed onto it by [`AtomicFile::commit`]; deleted when
/// dropped uncommitted.
pub struct AtomicFile {
    dest: PathBuf,
    tmp: tempfile::NamedTempFile,
    overwrite: bool,
}

impl AtomicFile {
    pub fn create(dest: &Path, overwrite: bool) -> Result<AtomicFile> {
        check_destination(dest, overwrite)?;
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "out".into());
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".partial")
            .tempfile_in(parent_dir(dest))
            .with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(AtomicFile {
            dest: dest.to_path_buf(),
            tmp,
            overwrite,
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    /// Flush to disk and rename onto the destination.
    pub fn commit(self) -> Result<()> {
        // Temporary files are created private (0600); give the output the permissions of the
        // file it replaces, or the usual 0644.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let perms = fs::metadata(&self.dest)
                .map(|m| m.permissions())
                .unwrap_or_else(|_| fs::Permissions::from_mode(0o644));
            self.tmp
                .as_file()
                .set_permissions(perms)
                .with_context(|| format!("cannot write {}", self.dest.display()))?;
        }
        self.tmp
            .as_file()
            .sync_all()
            .with_context(|| format!("cannot write {}", self.dest.display()))?;
        let res = if self.overwrite {
            self.tmp.persist(&self.dest).map(|_| ())
        } else {
            // Someone may have created the destination since we checked: never clobber it.
            self.tmp.persist_noclobber(&self.dest).map(|_| ())
        };
        res.map_err(|e| e.error).with_context(|| {
            format!(
                "cannot rename the finished output onto {}",
                self.dest.display()
            )
        })
    }
}

/// Streams frames into an H.264 MP4 file: `push` each frame, then `finish`.
///
/// Container: `ftyp` (isom, iso2, avc1, mp41), one video track, `avc1` sample entry whose `avcC`
/// holds the encoder's SPS and PPS; samples are the frame's NAL units with 4-byte length prefixes
/// (parameter sets removed from the samples). Timescale `1000 * fps`, each sample lasts 1000
/// ticks, so durations are exact for any integer fps; movie and track durations agree.
pub struct Mp4Writer {
    out: AtomicFile,
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
    /// Opens `<dest>`'s temporary file now (so an unwritable destination fails early).
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
        let out = AtomicFile::create(dest, overwrite)?;
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
            out,
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
        .context("cannot write MP4 sample")?;
        self.frames += 1;
        Ok(())
    }

    fn start_mux(&mut self) -> Result<()> {
        let timescale = TICKS_PER_FRAME * self.fps;
        let file = self.out.file().try_clone().context("cannot write MP4")?;
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
            .context("cannot write MP4 header")?;
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
        .context("cannot add MP4 video track")?;
        self.mux = Some(mux);
        Ok(())
    }

    pub fn frames_written(&self) -> u64 {
        self.frames
    }

    /// Writes the index (`moov`), flushes, and renames the file onto its destination.
    pub fn finish(mut self) -> Result<()> {
        ensure!(self.frames > 0, "no frames to write");
        let mut mux = self.mux.take().expect("frames > 0 implies started");
        mux.write_end().context("cannot finish MP4")?;
        let mut w = mux.into_writer();
        w.flush().context("cannot write MP4")?;
        let mut f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .context("cannot write MP4")?;
        // The muxer seeks back to patch sizes; make sure the file ends where the moov ends.
        let end = f.stream_position()?;
        f.set_len(end)?;
        self.out.commit()
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
    let mut writer = enc.write_header().context("cannot write PNG")?;
    writer
        .write_image_data(&frame.rgb)
        .context("cannot write PNG")?;
    writer.finish().context("cannot write PNG")?;
    Ok(())
}

/// Writes frames as `DIR/frame_00000.png`, ... : each file atomically.
pub struct PngSequence {
    dir: PathBuf,
    overwrite: bool,
    next: usize,
    /// We created `dir`: remove it again if dropped before any frame was written.
    created: bool,
}

impl Drop for PngSequence {
    fn drop(&mut self) {
        if self.created && self.next == 0 {
            // Only removes an empty folder: never anything someone else put there.
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

/// The file name of frame `i` in a PNG sequence.
pub fn png_name(i: usize) -> String {
    format!("frame_{i:05}.png")
}

impl PngSequence {
    /// Creates `dir` if needed. Refuses a folder that already holds `frame_*.png` files unless
    /// `overwrite`; checks the folder is writable now.
    pub fn create(dir: &Path, overwrite: bool) -> Result<PngSequence> {
        let created = !dir.exists();
        if !created {
            ensure!(dir.is_dir(), "{} exists and is not a folder", dir.display());
            if !overwrite {
                let existing = fs::read_dir(dir)
                    .with_context(|| format!("cannot read {}", dir.display()))?
                    .filter_map(|e| e.ok())
                    .any(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with("frame_") && n.ends_with(".png")
                    });
                ensure!(
                    !existing,
                    "{} already holds frame_*.png files (pass --overwrite to replace them)",
                    dir.display()
                );
            }
        } else {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create folder {}", dir.display()))?;
        }
        // Probe writability before any work is done.
        tempfile::Builder::new()
            .prefix(".probe.")
            .tempfile_in(dir)
            .with_context(|| format!("cannot write into {}", dir.display()))?;
        Ok(PngSequence {
            dir: dir.to_path_buf(),
            overwrite,
            next: 0,
            created,
        })
    }

    pub fn push(&mut self, frame: &Frame) -> Result<PathBuf> {
        let path = self.dir.join(png_name(self.next));
        let mut f = AtomicFile::create(&path, self.overwrite)?;
        let mut w = BufWriter::new(f.file());
        encode_png(frame, &mut w)?;
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        drop(w);
        f.commit()?;
        self.next += 1;
        Ok(path)
    }
}
