//! Block placement: replica r of block b of a file lives on dataserver (x + b + r) mod N,
//! where x is a hash of the file's stable id. Hashing the id rather than the path means rename moves
//! no data.

/// The ring offset x of a file: a fixed 64-bit mix (splitmix64's finalizer) of its id, so that
/// consecutive file ids start on unrelated servers. It must never change: it decides where data is.
pub fn file_offset(file_id: u64) -> u64 {
    let mut z = file_id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The server holding replica `r` of block `block` in a ring of `n` servers.
pub fn replica_server(file_id: u64, block: u64, r: usize, n: usize) -> usize {
    let n64 = n as u64;
    ((file_offset(file_id) % n64 + block % n64 + r as u64 % n64) % n64) as usize
}

/// The servers of all `replicas` replicas of a block, replica 0 first.
pub fn replica_servers(file_id: u64, block: u64, replicas: usize, n: usize) -> Vec<usize> {
    (0..replicas).map(|r| replica_server(file_id, block, r, n)).collect()
}

/// Whether `server` holds a replica of the block (used by rebuild, which knows only its own index).
pub fn holds(server: usize, file_id: u64, block: u64, replicas: usize, n: usize) -> bool {
    let first = replica_server(file_id, block, 0, n);
    (server + n - first) % n < replicas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_are_consecutive_servers_and_blocks_go_round_robin() {
        for n in [3usize, 4, 5, 64] {
            for fid in [2u64, 3, 1000, u64::MAX] {
                let x = replica_server(fid, 0, 0, n);
                for b in 0..10u64 {
                    for r in 0..3 {
                        assert_eq!(replica_server(fid, b, r, n), (x + b as usize + r) % n);
                        assert!(holds((x + b as usize + r) % n, fid, b, 3, n));
                    }
                    assert!(!holds((x + b as usize + 3) % n, fid, b, 3, n) || n <= 3);
                }
            }
        }
    }

    #[test]
    fn file_offsets_spread_over_the_ring() {
        let mut seen = [0usize; 4];
        for fid in 2..402u64 {
            seen[replica_server(fid, 0, 0, 4)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 60), "{seen:?}");
    }
}
