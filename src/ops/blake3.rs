//! `blake3`: the BLAKE3 digest of the body, as 64 lowercase hex digits and a newline.

use super::Output;
use crate::gpu::{Gpu, GpuError};

pub const CONTENT_TYPE: &str = "text/plain";

/// Encodes a 32-byte digest the way both paths answer.
pub fn encode(digest: &[u8; 32]) -> Output {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut body = Vec::with_capacity(65);
    for b in digest {
        body.push(HEX[(b >> 4) as usize]);
        body.push(HEX[(b & 15) as usize]);
    }
    body.push(b'\n');
    Output { content_type: CONTENT_TYPE, body }
}

pub fn cpu(input: &[u8]) -> Output {
    encode(::blake3::hash(input).as_bytes())
}

/// Chunks hashed in parallel on the GPU, then the tree reduced level by level.
pub fn gpu(gpu: &mut Gpu, len: usize) -> Result<Output, GpuError> {
    Ok(encode(&gpu.blake3(len)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_matches_known_vector_for_empty_input() {
        // The published BLAKE3 digest of the empty string.
        let out = cpu(b"");
        assert_eq!(
            out.body,
            b"af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262\n"
        );
        assert_eq!(out.content_type, "text/plain");
    }

    #[test]
    fn encode_is_lowercase_hex() {
        let mut d = [0u8; 32];
        d[0] = 0xAB;
        d[31] = 0x0F;
        let out = encode(&d);
        assert_eq!(out.body.len(), 65);
        assert!(out.body.starts_with(b"ab00"));
        assert!(out.body.ends_with(b"0f\n"));
    }
}
