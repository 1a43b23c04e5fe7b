//! MD5 checksums of blocks. Many blocks are hashed in one multi-buffer pass (md5-many: each SIMD
//! lane runs its own MD5, so a batch of 16 KiB blocks hashes about ten times faster than one at a
//! time); a single block takes md5-many's single-stream path. The SIMD level is detected once, at
//! run time, so a CPU without AVX2 or AVX-512 gets the narrower or scalar paths. md-5 stays the
//! reference: the tests hold both to it.

use std::sync::OnceLock;

pub type Checksum = [u8; 16];

fn engine() -> md5_many::Md5Many {
    static ENGINE: OnceLock<md5_many::Md5Many> = OnceLock::new();
    *ENGINE.get_or_init(md5_many::Md5Many::new)
}

/// The MD5 of `data`.
pub fn checksum(data: &[u8]) -> Checksum {
    md5_many::md5(data)
}

/// The MD5 of each of `inputs`, in one multi-buffer pass.
pub fn checksums(inputs: &[&[u8]]) -> Vec<Checksum> {
    let mut out = vec![[0u8; 16]; inputs.len()];
    match inputs {
        [] => {}
        [one] => out[0] = checksum(one),
        _ => engine().hash_many(inputs, &mut out),
    }
    out
}

/// The MD5 as the reference implementation (md-5) computes it.
pub fn reference(data: &[u8]) -> Checksum {
    use md5::Digest;
    md5::Md5::digest(data).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, RngCore, SeedableRng};

    #[test]
    fn batches_and_single_blocks_agree_with_the_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(19);
        for block in [512usize, 4096, 16384] {
            for batch in [1usize, 2, 3, 7, 8, 9, 16, 17, 33, 64] {
                // Random lengths from empty to three blocks, equal lengths too (the kernels differ).
                let equal = rng.random_bool(0.3);
                let len = rng.random_range(0..=3 * block);
                let inputs: Vec<Vec<u8>> = (0..batch)
                    .map(|_| {
                        let mut v = vec![0u8; if equal { len } else { rng.random_range(0..=3 * block) }];
                        rng.fill_bytes(&mut v);
                        v
                    })
                    .collect();
                let refs: Vec<&[u8]> = inputs.iter().map(Vec::as_slice).collect();
                let want: Vec<Checksum> = refs.iter().map(|d| reference(d)).collect();
                assert_eq!(checksums(&refs), want, "block {block}, batch {batch}, equal lengths {equal}");
                for (d, w) in refs.iter().zip(&want) {
                    assert_eq!(checksum(d), *w, "single stream, {} bytes", d.len());
                }
            }
        }
        assert!(checksums(&[]).is_empty());
        // RFC 1321's test vectors, through both paths.
        let abc: &[u8] = b"abc";
        let hex = |c: Checksum| c.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(checksum(b"")), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex(checksums(&[abc, abc])[1]), "900150983cd24fb0d6963f7d28e17f72");
    }
}
