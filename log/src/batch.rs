//! The stored form of one applied batch of records.
//!
//! `[ts_ms: u64 BE][count: u32 BE]` then, per record, `[key_len: varint][key][value_len:
//! varint][value]`. The fixed header lets retention read a batch's age and size without decoding
//! its records.

use bytes::Bytes;

use crate::types::Record;

const HEADER_BYTES: usize = 12;

/// The fixed part of a stored batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ts_ms: u64,
    pub count: u32,
}

/// A decoded batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub ts_ms: u64,
    pub records: Vec<Record>,
}

/// A stored batch that does not parse: the store is damaged.
#[derive(Debug, thiserror::Error)]
#[error("corrupt record batch: {0}")]
pub struct CorruptBatch(&'static str);

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, CorruptBatch> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or(CorruptBatch("truncated varint"))?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(CorruptBatch("varint too long"))
}

/// Encodes a batch.
pub fn encode(ts_ms: u64, records: &[Record]) -> Vec<u8> {
    let body: usize = records.iter().map(|r| r.key.len() + r.value.len() + 4).sum();
    let mut out = Vec::with_capacity(HEADER_BYTES + body);
    out.extend_from_slice(&ts_ms.to_be_bytes());
    out.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for r in records {
        put_varint(&mut out, r.key.len() as u64);
        out.extend_from_slice(&r.key);
        put_varint(&mut out, r.value.len() as u64);
        out.extend_from_slice(&r.value);
    }
    out
}

/// Reads the fixed header.
pub fn header(buf: &[u8]) -> Result<Header, CorruptBatch> {
    if buf.len() < HEADER_BYTES {
        return Err(CorruptBatch("short header"));
    }
    let mut ts = [0u8; 8];
    ts.copy_from_slice(&buf[..8]);
    let mut count = [0u8; 4];
    count.copy_from_slice(&buf[8..12]);
    Ok(Header {
        ts_ms: u64::from_be_bytes(ts),
        count: u32::from_be_bytes(count),
    })
}

/// The range of the next length-prefixed field.
fn take_range(buf: &[u8], pos: &mut usize) -> Result<std::ops::Range<usize>, CorruptBatch> {
    let len = get_varint(buf, pos)? as usize;
    let end = pos.checked_add(len).ok_or(CorruptBatch("length overflow"))?;
    if end > buf.len() {
        return Err(CorruptBatch("truncated record"));
    }
    let r = *pos..end;
    *pos = end;
    Ok(r)
}

fn take(buf: &[u8], pos: &mut usize) -> Result<(), CorruptBatch> {
    take_range(buf, pos).map(|_| ())
}

/// Checks that a batch holds exactly what its header says, without copying its records.
pub fn validate(buf: &[u8]) -> Result<Header, CorruptBatch> {
    let h = header(buf)?;
    let mut pos = HEADER_BYTES;
    for _ in 0..h.count {
        take(buf, &mut pos)?;
        take(buf, &mut pos)?;
    }
    if pos != buf.len() {
        return Err(CorruptBatch("trailing bytes"));
    }
    Ok(h)
}

/// Decodes a whole batch, checking that it holds exactly what its header says. The records'
/// keys and values are slices of `buf`: no copy per record.
pub fn decode(buf: &Bytes) -> Result<Decoded, CorruptBatch> {
    let h = header(buf)?;
    let mut pos = HEADER_BYTES;
    let mut records = Vec::with_capacity((h.count as usize).min(buf.len()));
    for _ in 0..h.count {
        let key = buf.slice(take_range(buf, &mut pos)?);
        let value = buf.slice(take_range(buf, &mut pos)?);
        records.push(Record { key, value });
    }
    if pos != buf.len() {
        return Err(CorruptBatch("trailing bytes"));
    }
    Ok(Decoded {
        ts_ms: h.ts_ms,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_records_of_every_size_class() {
        let records: Vec<Record> = [0usize, 1, 127, 128, 16_383, 16_384, 100_000]
            .iter()
            .map(|&n| Record::new(vec![7u8; n % 300], vec![n as u8; n]))
            .collect();
        let buf = encode(42, &records);
        let d = decode(&Bytes::from(buf.clone())).unwrap();
        assert_eq!(d.ts_ms, 42);
        assert_eq!(d.records, records);
        assert_eq!(
            header(&buf).unwrap(),
            Header {
                ts_ms: 42,
                count: records.len() as u32
            }
        );
    }

    #[test]
    fn rejects_truncated_and_padded_batches() {
        let buf = encode(1, &[Record::new("k", "value")]);
        for cut in 0..buf.len() {
            assert!(
                decode(&Bytes::copy_from_slice(&buf[..cut])).is_err(),
                "cut at {cut} must not decode"
            );
        }
        for cut in 0..buf.len() {
            assert!(validate(&buf[..cut]).is_err(), "cut at {cut} must not validate");
        }
        let mut padded = buf.clone();
        padded.push(0);
        assert!(decode(&Bytes::from(padded.clone())).is_err());
        assert!(validate(&padded).is_err());
        assert_eq!(validate(&buf).unwrap(), header(&buf).unwrap());
    }
}
