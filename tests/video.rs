//! The video writers: MP4 checked by parsing the container with the `mp4` reader and decoding
//! with openh264's decoder; PNG read back with the `png` decoder; atomic-write behaviour.

use std::io::Cursor;
use std::path::Path;

use video_infinity::video::{png_name, Frame, Mp4Writer, PngSequence};

/// A smooth test picture that moves with `t` (H.264 at default quality reproduces it closely).
fn test_frame(w: usize, h: usize, t: usize) -> Frame {
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            rgb.push(((x * 255) / w) as u8);
            rgb.push(((y * 255) / h) as u8);
            rgb.push((((x + y + 4 * t) * 2) % 256) as u8 / 2 + 64);
        }
    }
    Frame::new(w, h, rgb).unwrap()
}

fn no_partials(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
fn mp4_container_and_first_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let (w, h, n, fps) = (96usize, 64usize, 11usize, 8u32);
    let frames: Vec<Frame> = (0..n).map(|t| test_frame(w, h, t)).collect();
    let mut wr = Mp4Writer::create(&path, w, h, fps, false).unwrap();
    for f in &frames {
        wr.push(f).unwrap();
    }
    assert_eq!(wr.frames_written(), n as u64);
    wr.finish().unwrap();
    no_partials(dir.path());

    let bytes = std::fs::read(&path).unwrap();
    let size = bytes.len() as u64;
    let mut reader = mp4::Mp4Reader::read_header(Cursor::new(&bytes), size).unwrap();
    assert_eq!(reader.tracks().len(), 1, "one track");
    let (&track_id, track) = reader.tracks().iter().next().unwrap();
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    assert_eq!(track.track_type().unwrap(), mp4::TrackType::Video);
    assert_eq!((track.width() as usize, track.height() as usize), (w, h));
    assert_eq!(track.sample_count() as usize, n);
    // n frames at fps: the duration is exact.
    let dur = track.duration();
    assert_eq!(dur.as_millis(), (n as u128 * 1000) / fps as u128, "{dur:?}");
    assert!(
        (track.frame_rate() - fps as f64).abs() < 1e-6,
        "{}",
        track.frame_rate()
    );
    let sps = track.sequence_parameter_set().unwrap().to_vec();
    let pps = track.picture_parameter_set().unwrap().to_vec();
    assert_eq!(sps[0] & 0x1f, 7, "avcC holds an SPS");
    assert_eq!(pps[0] & 0x1f, 8, "avcC holds a PPS");

    // First sample: an IDR picture; convert length-prefixed NALs to Annex B with the parameter
    // sets in front, and decode it.
    let sample = reader.read_sample(track_id, 1).unwrap().unwrap();
    assert!(sample.is_sync, "first sample is a sync sample");
    let mut annexb = Vec::new();
    for ps in [&sps, &pps] {
        annexb.extend_from_slice(&[0, 0, 0, 1]);
        annexb.extend_from_slice(ps);
    }
    let mut data = &sample.bytes[..];
    let mut saw_idr = false;
    while !data.is_empty() {
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        let nal = &data[4..4 + len];
        saw_idr |= nal[0] & 0x1f == 5;
        annexb.extend_from_slice(&[0, 0, 0, 1]);
        annexb.extend_from_slice(nal);
        data = &data[4 + len..];
    }
    assert!(saw_idr, "first sample holds an IDR slice");
    let mut dec = openh264::decoder::Decoder::new().unwrap();
    let mut rgb = vec![0u8; w * h * 3];
    match dec.decode(&annexb).unwrap() {
        Some(img) => img.write_rgb8(&mut rgb),
        None => {
            let rest = dec.flush_remaining().unwrap();
            rest[0].write_rgb8(&mut rgb);
        }
    }
    // Lossy codec + 4:2:0 chroma: compare by PSNR against the source frame.
    let mse: f64 = rgb
        .iter()
        .zip(&frames[0].rgb)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum::<f64>()
        / rgb.len() as f64;
    let psnr = 10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10();
    assert!(psnr > 30.0, "decoded first frame PSNR {psnr:.1} dB");
}

#[test]
fn mp4_refuses_existing_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.mp4");
    std::fs::write(&path, b"precious").unwrap();
    let err = Mp4Writer::create(&path, 64, 64, 8, false).err().unwrap();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert!(err.to_string().contains("--overwrite"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    // An interrupted write (writer dropped before finish) leaves the old file and no partial.
    let mut wr = Mp4Writer::create(&path, 64, 64, 8, true).unwrap();
    wr.push(&test_frame(64, 64, 0)).unwrap();
    drop(wr);
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    no_partials(dir.path());

    // With overwrite and finish, it is replaced.
    let mut wr = Mp4Writer::create(&path, 64, 64, 8, true).unwrap();
    wr.push(&test_frame(64, 64, 0)).unwrap();
    wr.finish().unwrap();
    assert_ne!(std::fs::read(&path).unwrap(), b"precious");
    no_partials(dir.path());
}

#[test]
fn mp4_unwritable_destination_fails_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let err = Mp4Writer::create(&dir.path().join("no/such/dir/x.mp4"), 64, 64, 8, false)
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = Mp4Writer::create(&dir.path().join("x.mp4"), 65, 64, 8, false)
        .err()
        .unwrap();
    assert!(err.to_string().contains("even"), "{err}");
}

#[test]
fn png_sequence_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("frames");
    let frames: Vec<Frame> = (0..3).map(|t| test_frame(40, 24, t)).collect();
    let mut seq = PngSequence::create(&out, false).unwrap();
    for f in &frames {
        seq.push(f).unwrap();
    }
    // Frames reach the folder when the sequence is finished.
    assert!(!out.exists());
    seq.finish().unwrap();
    for (i, f) in frames.iter().enumerate() {
        let file = std::fs::File::open(out.join(png_name(i))).unwrap();
        let mut rd = png::Decoder::new(std::io::BufReader::new(file))
            .read_info()
            .unwrap();
        let mut buf = vec![0; rd.output_buffer_size().unwrap()];
        let info = rd.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (40, 24));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &f.rgb[..], "frame {i} exact");
    }
    no_partials(&out);
    // A folder that already holds frames is refused without --overwrite.
    let err = PngSequence::create(&out, false).err().unwrap();
    assert!(err.to_string().contains("--overwrite"), "{err}");
    assert!(PngSequence::create(&out, true).is_ok());
}
