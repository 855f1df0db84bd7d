//! zstd layers: Linux reads them with the C zstd library; other hosts
//! (macOS) with the pure-Rust `ruzstd`, frame after frame as the C
//! decoder does (a layer may hold several frames). The `ruzstd` reader is
//! also built into the tests on Linux, where they run.

use std::io::{self, BufRead, Read};

/// The decompressed stream of the zstd data in `source`.
pub fn reader<'a, R: BufRead + 'a>(source: R) -> io::Result<Box<dyn Read + 'a>> {
    #[cfg(target_os = "linux")]
    {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(source)?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(Box::new(frames::Frames::new(source)))
    }
}

/// zstd-compresses `data` (test images).
#[cfg(any(test, feature = "fixture"))]
pub fn compress(data: &[u8]) -> Vec<u8> {
    #[cfg(target_os = "linux")]
    {
        zstd::encode_all(data, 1).expect("compressing in memory cannot fail")
    }
    #[cfg(not(target_os = "linux"))]
    {
        ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
    }
}

#[cfg(any(not(target_os = "linux"), test))]
mod frames {
    use std::io::{self, BufRead, Read};

    use ruzstd::decoding::{FrameDecoder, StreamingDecoder};

    enum State<R: BufRead> {
        /// Before a frame (or at the end of the input).
        Between(R),
        In(Box<StreamingDecoder<R, FrameDecoder>>),
        /// After an error.
        Failed,
    }

    /// Every zstd frame of a stream, one after the other.
    pub struct Frames<R: BufRead>(State<R>);

    impl<R: BufRead> Frames<R> {
        pub fn new(source: R) -> Frames<R> {
            Frames(State::Between(source))
        }
    }

    impl<R: BufRead> Read for Frames<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                match std::mem::replace(&mut self.0, State::Failed) {
                    State::In(mut frame) => {
                        let n = frame.read(buf)?;
                        if n > 0 || buf.is_empty() {
                            self.0 = State::In(frame);
                            return Ok(n);
                        }
                        self.0 = State::Between(frame.into_inner());
                    }
                    State::Between(mut source) => {
                        if source.fill_buf()?.is_empty() {
                            self.0 = State::Between(source);
                            return Ok(0);
                        }
                        let frame = StreamingDecoder::new(source).map_err(io::Error::other)?;
                        self.0 = State::In(Box::new(frame));
                    }
                    State::Failed => {
                        return Err(io::Error::other(
                            "the zstd stream is damaged (an earlier read failed)",
                        ))
                    }
                }
            }
        }
    }

    // Their input comes from the C library, on Linux.
    #[cfg(all(test, target_os = "linux"))]
    mod tests {
        use super::*;

        fn decode(data: &[u8]) -> io::Result<Vec<u8>> {
            let mut out = Vec::new();
            Frames::new(data).read_to_end(&mut out)?;
            Ok(out)
        }

        #[test]
        fn reads_every_frame_as_the_c_library_writes_them() {
            let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
            let mut stream = zstd::encode_all(&big[..], 3).unwrap();
            stream.extend(zstd::encode_all(&b"second frame"[..], 1).unwrap());
            let mut want = big.clone();
            want.extend_from_slice(b"second frame");
            assert_eq!(decode(&stream).unwrap(), want);
            assert_eq!(decode(&[]).unwrap(), Vec::<u8>::new());
        }

        #[test]
        fn damaged_streams_are_errors() {
            let mut stream = zstd::encode_all(&b"some text to squeeze"[..], 1).unwrap();
            assert!(decode(&stream[..stream.len() - 3]).is_err());
            stream[0] ^= 0xff;
            assert!(decode(&stream).is_err());
            assert!(decode(b"not zstd at all").is_err());
        }
    }
}
