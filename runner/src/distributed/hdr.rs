//! HdrHistogram V2 (+DEFLATE) blobs decoded sparsely, into the non-empty buckets only.
//!
//! Why not `hdrhistogram`'s own deserializer: it materializes a full histogram per blob — for
//! the runner's layout (1 µs – 1 h, 3 digits) a 23 552-bucket, 184 KiB counts array that is
//! zeroed, filled, then walked again by every `add`. An interval report holds a few dozen
//! blobs with a few hundred non-empty buckets each, so on the coordinator that allocation and
//! those walks were nearly all of the merge cost. Decoding to `(value, count)` pairs and
//! recording them with `record_n` lands every count in the same bucket (a bucket's lowest value
//! maps back to its index), so the merge stays exact; the property test below holds it to the
//! crate's own deserializer. Blobs are only accepted in the runner's exact layout, and their
//! inflated size is capped, so a bad blob cannot make the coordinator allocate much.

use std::cell::RefCell;
use std::sync::LazyLock;

use flate2::{Decompress, FlushDecompress, Status};
use hdrhistogram::Histogram;

use crate::metrics;

const V2_COOKIE: u32 = 0x1c84_9303 | 0x10;
const V2_COMPRESSED_COOKIE: u32 = 0x1c84_9304 | 0x10;
/// cookie, payload length, normalizing offset, digits (u32 each), low, high (u64), ratio (f64).
const HEADER_LEN: usize = 40;
/// The runner's layout: 1 µs lowest discernible value (unit magnitude 0), 3 significant digits
/// (2 048 sub-buckets, half of them 1 024 = 2^10).
const HALF_MAGNITUDE: u32 = 10;
const HALF_COUNT: u64 = 1 << HALF_MAGNITUDE;

/// Buckets of the runner's histograms.
static BUCKETS: LazyLock<usize> = LazyLock::new(|| metrics::new_histogram().distinct_values());

/// What is wrong with a blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Shorter than its header says.
    #[error("truncated")]
    Truncated,
    /// Not a V2 histogram.
    #[error("not an HdrHistogram V2 blob (cookie {0:#x})")]
    Cookie(u32),
    /// The compressed payload does not inflate.
    #[error("bad DEFLATE payload: {0}")]
    Deflate(String),
    /// A layout other than the runner's.
    #[error(
        "layout {low}..{high} with {digits} digits, expected 1..{} µs with 3",
        metrics::MAX_MICROS
    )]
    Layout {
        /// Lowest discernible value.
        low: u64,
        /// Highest trackable value.
        high: u64,
        /// Significant digits.
        digits: u32,
    },
    /// Counts past the last bucket, or a negative count.
    #[error("counts do not fit the layout")]
    Counts,
}

/// The non-empty buckets of a histogram: (lowest value of the bucket, count).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sparse {
    buckets: Vec<(u64, u64)>,
}

impl Sparse {
    /// Samples in it.
    pub fn len(&self) -> u64 {
        self.buckets.iter().map(|(_, c)| c).sum()
    }

    /// Whether it holds no samples.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Adds its counts into `h` (a histogram of the runner's layout: `metrics::new_histogram`).
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for (value, count) in &self.buckets {
            // Bucket values of the shared layout are always in range.
            let _ = h.record_n(*value, *count);
        }
    }
}

/// The lowest value of bucket `index` in the runner's layout.
fn value_of(index: usize) -> u64 {
    let index = index as u64;
    match (index >> HALF_MAGNITUDE).checked_sub(1) {
        // The first bucket's lower half: values 0..1024 one by one.
        None => index,
        Some(bucket) => ((index & (HALF_COUNT - 1)) + HALF_COUNT) << bucket,
    }
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, BlobError> {
    let bytes: [u8; 4] = b
        .get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .ok_or(BlobError::Truncated)?;
    Ok(u32::from_be_bytes(bytes))
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, BlobError> {
    let bytes: [u8; 8] = b
        .get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .ok_or(BlobError::Truncated)?;
    Ok(u64::from_be_bytes(bytes))
}

/// HdrHistogram's LEB128 variant: at most 9 bytes, the 9th carrying 8 bits.
fn varint(b: &[u8], at: &mut usize) -> Result<u64, BlobError> {
    let mut value = 0u64;
    for i in 0..9 {
        let byte = *b.get(*at).ok_or(BlobError::Truncated)?;
        *at += 1;
        if i == 8 {
            return Ok(value | (u64::from(byte) << 56));
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Ok(value)
}

/// The most a valid blob of the runner's layout inflates to: the header plus nine bytes (the
/// longest varint) per bucket.
fn inflated_limit() -> usize {
    HEADER_LEN + 9 * *BUCKETS
}

thread_local! {
    /// One inflater and output buffer per thread, reset per blob: setting up a fresh one (its
    /// window and tables zeroed) cost more than inflating a small blob.
    static INFLATER: RefCell<(Decompress, Vec<u8>)> =
        RefCell::new((Decompress::new(true), vec![0; inflated_limit()]));
}

/// Decodes a V2 or V2+DEFLATE blob of the runner's layout.
pub fn decode(blob: &[u8]) -> Result<Sparse, BlobError> {
    match be_u32(blob, 0)? {
        V2_COOKIE => parse(blob),
        V2_COMPRESSED_COOKIE => {
            let len = be_u32(blob, 4)? as usize;
            let deflated = blob.get(8..8 + len).ok_or(BlobError::Truncated)?;
            INFLATER.with_borrow_mut(|(inflater, out)| {
                inflater.reset(true);
                // Into a buffer zeroed once, of the most a valid blob inflates to (that is
                // the cap); `decompress_vec` would zero its whole spare capacity every time.
                let status = inflater
                    .decompress(deflated, out, FlushDecompress::Finish)
                    .map_err(|e| BlobError::Deflate(e.to_string()))?;
                let produced = usize::try_from(inflater.total_out()).unwrap_or(usize::MAX);
                let inflated = out.get(..produced).ok_or(BlobError::Counts)?;
                match status {
                    Status::StreamEnd => {}
                    _ if produced >= out.len() => return Err(BlobError::Counts),
                    _ => return Err(BlobError::Truncated),
                }
                let inner = be_u32(inflated, 0)?;
                if inner != V2_COOKIE {
                    return Err(BlobError::Cookie(inner));
                }
                parse(inflated)
            })
        }
        other => Err(BlobError::Cookie(other)),
    }
}

/// Parses an uncompressed V2 histogram.
fn parse(v2: &[u8]) -> Result<Sparse, BlobError> {
    let payload_len = be_u32(v2, 4)? as usize;
    let normalizing = be_u32(v2, 8)?;
    let digits = be_u32(v2, 12)?;
    let low = be_u64(v2, 16)?;
    let high = be_u64(v2, 24)?;
    let ratio = f64::from_bits(be_u64(v2, 32)?);
    if normalizing != 0 || low != 1 || high != metrics::MAX_MICROS || digits != 3 || ratio != 1.0 {
        return Err(BlobError::Layout { low, high, digits });
    }
    let payload = v2
        .get(HEADER_LEN..HEADER_LEN + payload_len)
        .ok_or(BlobError::Truncated)?;
    let mut buckets = Vec::new();
    let (mut at, mut index) = (0usize, 0usize);
    while at < payload.len() {
        let raw = varint(payload, &mut at)?;
        // Zig-zag: negative numbers are runs of empty buckets.
        let n = ((raw >> 1) as i64) ^ -((raw & 1) as i64);
        if n < 0 {
            index = index
                .checked_add(usize::try_from(n.unsigned_abs()).map_err(|_| BlobError::Counts)?)
                .ok_or(BlobError::Counts)?;
            continue;
        }
        if index >= *BUCKETS {
            return Err(BlobError::Counts);
        }
        if n > 0 {
            buckets.push((value_of(index), n as u64));
        }
        index += 1;
    }
    Ok(Sparse { buckets })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::{
        Deserializer, Serializer, V2DeflateSerializer, V2Serializer,
    };
    use proptest::prelude::*;

    #[test]
    fn bucket_values_map_back_to_their_buckets() {
        let h = metrics::new_histogram();
        for index in [0usize, 1, 1_023, 1_024, 2_047, 2_048, 5_000, *BUCKETS - 1] {
            let v = value_of(index);
            assert_eq!(h.lowest_equivalent(v), v, "index {index} → {v}");
        }
        assert!(value_of(*BUCKETS - 1) >= metrics::MAX_MICROS / 2);
    }

    proptest! {
        /// Sparse decoding adds exactly what the crate's own deserializer would.
        #[test]
        fn sparse_decoding_equals_the_crates_deserializer(
            values in prop::collection::vec((1u64..metrics::MAX_MICROS, 1u64..1_000), 0..300),
            deflate in any::<bool>(),
        ) {
            let mut h = metrics::new_histogram();
            for (v, n) in &values {
                h.record_n(*v, *n).expect("in range");
            }
            let mut blob = Vec::new();
            if deflate {
                V2DeflateSerializer::new().serialize(&h, &mut blob).expect("serializes");
            } else {
                V2Serializer::new().serialize(&h, &mut blob).expect("serializes");
            }
            let sparse = decode(&blob).expect("decodes");
            prop_assert_eq!(sparse.len(), h.len());
            let mut ours = metrics::new_histogram();
            sparse.add_to(&mut ours);
            let theirs: Histogram<u64> = Deserializer::new().deserialize(&mut &blob[..]).expect("deserializes");
            prop_assert!(ours == theirs);
            prop_assert!(ours == h);
            // Merging into a histogram that already has samples stays exact too.
            let mut a = h.clone();
            sparse.add_to(&mut a);
            let mut b = h.clone();
            b.add(&h).expect("same layout");
            prop_assert!(a == b);
        }
    }

    #[test]
    fn bad_blobs_are_refused() {
        assert_eq!(decode(b""), Err(BlobError::Truncated));
        assert!(matches!(
            decode(b"\0\0\0\0garbage"),
            Err(BlobError::Cookie(0))
        ));
        let mut wide = Histogram::<u64>::new_with_bounds(1, u64::MAX / 4, 3).expect("bounds");
        wide.record(5).expect("in range");
        let mut blob = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&wide, &mut blob)
            .expect("serializes");
        assert!(matches!(decode(&blob), Err(BlobError::Layout { .. })));
        // A compressed blob whose payload is cut short.
        let mut h = metrics::new_histogram();
        h.record(1_234).expect("in range");
        let mut blob = Vec::new();
        V2DeflateSerializer::new()
            .serialize(&h, &mut blob)
            .expect("serializes");
        blob.truncate(blob.len() - 3);
        assert!(decode(&blob).is_err());
        // Counts beyond the last bucket: an uncompressed blob with a long run of zeros.
        let mut raw = Vec::new();
        V2Serializer::new()
            .serialize(&h, &mut raw)
            .expect("serializes");
        let mut header = raw[..HEADER_LEN].to_vec();
        let payload = [0xff, 0xff, 0xff, 0x7f, 0x02]; // -(2^27) zeros, then a count of 1
        header[4..8].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        header.extend_from_slice(&payload);
        assert_eq!(decode(&header), Err(BlobError::Counts));
    }
}
