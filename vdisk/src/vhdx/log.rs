//! The metadata log (MS-VHDX 2.3): finding the active sequence, replaying it
//! (on disk, or into an in-memory overlay for read-only opens), and encoding
//! the entries the writer puts in it.

use std::io;

use crate::bytes::{le32, le64, put_le32, put_le64};
use crate::crc::crc32c;
use crate::vhdx::guid::Guid;
use crate::{Error, Result, Storage};

pub const SECTOR: u64 = 4096;
/// Entries larger than this are refused (they are read whole to check their CRC).
const MAX_ENTRY: u64 = 64 << 20;
/// Replay may not write below this: the file identifier and the headers are
/// never logged.
const PROTECTED: u64 = 192 * 1024;
/// Replay targets and file sizes beyond this are not believed.
const MAX_FILE: u64 = 1 << 50;

/// One change to the file that a log entry records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Writes a whole 4 KiB sector.
    Data { offset: u64, sector: Vec<u8> },
    /// Writes zeros.
    Zero { offset: u64, length: u64 },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match self {
            Op::Data { offset, .. } => (*offset, SECTOR),
            Op::Zero { offset, length } => (*offset, *length),
        }
    }
}

/// What replaying the active sequence does to the file.
#[derive(Debug)]
pub struct Replay {
    pub ops: Vec<Op>,
    /// The file must be at least this long (else it was truncated).
    pub flushed_file_offset: u64,
    /// The file must be grown to at least this length.
    pub last_file_offset: u64,
    pub entries: usize,
}

/// A parsed, valid log entry.
struct Entry {
    seq: u64,
    tail: u64,
    length: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    ops: Vec<Op>,
}

/// The log region of the file.
pub struct Log<'a> {
    storage: &'a dyn Storage,
    offset: u64,
    length: u64,
}

impl<'a> Log<'a> {
    pub fn new(storage: &'a dyn Storage, offset: u64, length: u64) -> Log<'a> {
        Log {
            storage,
            offset,
            length,
        }
    }

    /// Reads `len` bytes at log position `pos`, wrapping at the end of the log.
    fn read(&self, pos: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        let mut done = 0u64;
        while done < len {
            let p = (pos + done) % self.length;
            let n = (len - done).min(self.length - p);
            self.storage.read_exact_at(
                &mut buf[done as usize..(done + n) as usize],
                self.offset + p,
            )?;
            done += n;
        }
        Ok(buf)
    }

    /// The entry at `pos`, if it is valid for `guid`.
    fn entry(&self, pos: u64, guid: Guid) -> Result<Option<Entry>> {
        let head = self.read(pos, SECTOR)?;
        if &head[..4] != b"loge" {
            return Ok(None);
        }
        let length = le32(&head, 8) as u64;
        if length == 0
            || !length.is_multiple_of(SECTOR)
            || length > self.length
            || length > MAX_ENTRY
        {
            return Ok(None);
        }
        let whole = if length == SECTOR {
            head
        } else {
            self.read(pos, length)?
        };
        Ok(parse_entry(&whole, guid, self.length))
    }

    /// Finds the active sequence (MS-VHDX 2.3.3) for `guid` and returns what
    /// replaying it does, or `None` when the log holds no valid sequence.
    pub fn find_active(&self, guid: Guid) -> Result<Option<Replay>> {
        if self.length == 0 {
            return Ok(None);
        }
        // Each candidate: (positions of its entries, head sequence number).
        let mut best: Option<(Vec<(u64, u64)>, u64)> = None;
        let mut tail = 0u64;
        while tail < self.length {
            let mut run: Vec<(u64, u64, u64)> = Vec::new(); // (pos, seq, tail field)
            let mut total = 0u64;
            loop {
                let pos = (tail + total) % self.length;
                let Some(e) = self.entry(pos, guid)? else {
                    break;
                };
                if run
                    .last()
                    .is_some_and(|&(_, seq, _)| e.seq != seq.wrapping_add(1))
                    || total + e.length > self.length
                {
                    break;
                }
                run.push((pos, e.seq, e.tail));
                total += e.length;
            }
            if let Some(&(_, head_seq, head_tail)) = run.last() {
                // Valid if the head's tail is an entry of the run.
                if let Some(first) = run.iter().position(|&(p, _, _)| p == head_tail)
                    && best.as_ref().is_none_or(|(_, s)| head_seq > *s)
                {
                    let seq: Vec<(u64, u64)> =
                        run[first..].iter().map(|&(p, s, _)| (p, s)).collect();
                    best = Some((seq, head_seq));
                }
                tail += total;
            } else {
                tail += SECTOR;
            }
        }
        let Some((sequence, _)) = best else {
            return Ok(None);
        };
        let mut replay = Replay {
            ops: Vec::new(),
            flushed_file_offset: 0,
            last_file_offset: 0,
            entries: sequence.len(),
        };
        for &(pos, seq) in &sequence {
            let e = self.entry(pos, guid)?.filter(|e| e.seq == seq);
            let e = e.ok_or_else(|| {
                Error::corrupt("VHDX log", format!("entry at {pos} changed while reading"))
            })?;
            replay.flushed_file_offset = e.flushed_file_offset;
            replay.last_file_offset = e.last_file_offset;
            replay.ops.extend(e.ops);
        }
        for op in &replay.ops {
            let (offset, length) = op.range();
            if offset < PROTECTED || offset.checked_add(length).is_none_or(|end| end > MAX_FILE) {
                return Err(Error::corrupt(
                    "VHDX log",
                    format!("entry writes {length} bytes at {offset}"),
                ));
            }
        }
        if replay.last_file_offset > MAX_FILE {
            return Err(Error::corrupt(
                "VHDX log",
                format!("last file offset {}", replay.last_file_offset),
            ));
        }
        Ok(Some(replay))
    }
}

/// Checks one whole entry: signature, length, tail, sequence numbers in the
/// descriptors and data sectors, log GUID, CRC-32C over the entry.
fn parse_entry(b: &[u8], guid: Guid, log_length: u64) -> Option<Entry> {
    let length = le32(b, 8) as u64;
    let tail = le32(b, 12) as u64;
    let seq = le64(b, 16);
    let count = le32(b, 24) as u64;
    if &b[..4] != b"loge"
        || length != b.len() as u64
        || !tail.is_multiple_of(SECTOR)
        || tail >= log_length
        || seq == 0
    {
        return None;
    }
    if Guid(crate::bytes::arr(b, 32)) != guid {
        return None;
    }
    let desc_sectors = (count + 2).div_ceil(128);
    if desc_sectors * SECTOR > length {
        return None;
    }
    let mut copy = b.to_vec();
    copy[4..8].fill(0);
    if crc32c(&copy) != le32(b, 4) {
        return None;
    }
    let mut ops = Vec::with_capacity(count as usize);
    let mut data_sector = desc_sectors;
    for i in 0..count as usize {
        let d = &b[64 + 32 * i..96 + 32 * i];
        let offset = le64(d, 16);
        if le64(d, 24) != seq || !offset.is_multiple_of(SECTOR) {
            return None;
        }
        match &d[..4] {
            b"zero" => {
                let length = le64(d, 8);
                if !length.is_multiple_of(SECTOR) {
                    return None;
                }
                ops.push(Op::Zero { offset, length });
            }
            b"desc" => {
                if (data_sector + 1) * SECTOR > length {
                    return None;
                }
                let s = &b[(data_sector * SECTOR) as usize..((data_sector + 1) * SECTOR) as usize];
                if &s[..4] != b"data"
                    || le32(s, 4) != (seq >> 32) as u32
                    || le32(s, 4092) != seq as u32
                {
                    return None;
                }
                let mut sector = vec![0u8; SECTOR as usize];
                sector[..8].copy_from_slice(&d[8..16]);
                sector[8..4092].copy_from_slice(&s[8..4092]);
                sector[4092..].copy_from_slice(&d[4..8]);
                ops.push(Op::Data { offset, sector });
                data_sector += 1;
            }
            _ => return None,
        }
    }
    Some(Entry {
        seq,
        tail,
        length,
        flushed_file_offset: le64(b, 48),
        last_file_offset: le64(b, 56),
        ops,
    })
}

/// Encodes one entry at log position `tail` (a one-entry sequence) holding
/// whole-sector writes.
pub fn encode_entry(
    guid: Guid,
    seq: u64,
    tail: u64,
    file_len: u64,
    sectors: &[(u64, &[u8])],
) -> Vec<u8> {
    let count = sectors.len() as u64;
    let desc_sectors = (count + 2).div_ceil(128);
    let length = (desc_sectors + count) * SECTOR;
    let mut b = vec![0u8; length as usize];
    b[..4].copy_from_slice(b"loge");
    put_le32(&mut b, 8, length as u32);
    put_le32(&mut b, 12, tail as u32);
    put_le64(&mut b, 16, seq);
    put_le32(&mut b, 24, count as u32);
    b[32..48].copy_from_slice(&guid.0);
    put_le64(&mut b, 48, file_len);
    put_le64(&mut b, 56, file_len);
    for (i, (offset, data)) in sectors.iter().enumerate() {
        let d = 64 + 32 * i;
        b[d..d + 4].copy_from_slice(b"desc");
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[..8]);
        put_le64(&mut b, d + 16, *offset);
        put_le64(&mut b, d + 24, seq);
        let s = ((desc_sectors + i as u64) * SECTOR) as usize;
        b[s..s + 4].copy_from_slice(b"data");
        put_le32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put_le32(&mut b, s + 4092, seq as u32);
    }
    let crc = crc32c(&b);
    put_le32(&mut b, 4, crc);
    b
}

/// How many sector writes fit in one entry of a log of `log_length` bytes.
pub fn capacity(log_length: u64) -> usize {
    let sectors = log_length / SECTOR;
    let mut n = sectors.saturating_sub(1);
    while n > 0 && (n + 2).div_ceil(128) + n > sectors {
        n -= 1;
    }
    n as usize
}

/// Applies a replay to the file itself, then grows it to the last file offset.
pub fn replay_on_disk(storage: &dyn Storage, replay: &Replay) -> Result<()> {
    let zeros = vec![0u8; 1 << 20];
    for op in &replay.ops {
        match op {
            Op::Data { offset, sector } => storage.write_all_at(sector, *offset)?,
            Op::Zero { offset, length } => {
                let mut done = 0u64;
                while done < *length {
                    let n = (*length - done).min(zeros.len() as u64);
                    storage.write_all_at(&zeros[..n as usize], offset + done)?;
                    done += n;
                }
            }
        }
    }
    if storage.len()? < replay.last_file_offset {
        storage.set_len(replay.last_file_offset)?;
    }
    Ok(())
}

/// A read-only view of a file with a replayed log applied in memory; the
/// file underneath is never written.
pub struct Overlay {
    base: Box<dyn Storage>,
    ops: Vec<Op>,
    len: u64,
}

impl Overlay {
    pub fn new(base: Box<dyn Storage>, replay: Replay) -> io::Result<Overlay> {
        let mut len = base.len()?.max(replay.last_file_offset);
        for op in &replay.ops {
            let (o, l) = op.range();
            len = len.max(o + l);
        }
        Ok(Overlay {
            base,
            ops: replay.ops,
            len,
        })
    }
}

impl Storage for Overlay {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.len {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.len - offset) as usize;
        let buf = &mut buf[..n];
        let base_len = self.base.len()?;
        let from_base = base_len.saturating_sub(offset).min(n as u64) as usize;
        self.base.read_exact_at(&mut buf[..from_base], offset)?;
        buf[from_base..].fill(0);
        let end = offset + n as u64;
        for op in &self.ops {
            let (o, l) = op.range();
            let (lo, hi) = (o.max(offset), (o + l).min(end));
            if lo >= hi {
                continue;
            }
            let dst = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            match op {
                Op::Data { sector, .. } => {
                    dst.copy_from_slice(&sector[(lo - o) as usize..(hi - o) as usize])
                }
                Op::Zero { .. } => dst.fill(0),
            }
        }
        Ok(n)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "image opened read-only",
        ))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "image opened read-only",
        ))
    }
    /// A flush on a read-only open still flushes the file underneath.
    fn sync(&self) -> io::Result<()> {
        self.base.sync()
    }
    fn is_writable(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;

    const LOG: u64 = 1 << 20;

    fn sector(fill: u8) -> Vec<u8> {
        let mut s = vec![fill; 4096];
        s[0] = 0xA0;
        s[4095] = 0x0A;
        s
    }

    #[test]
    fn single_entry_round_trip() {
        let guid = Guid([9; 16]);
        let s = MemStorage::new(vec![0u8; 3 << 20]);
        let a = sector(1);
        let e = encode_entry(guid, 5, 0, 3 << 20, &[(2 << 20, &a)]);
        s.write_all_at(&e, LOG).unwrap();
        let log = Log::new(&s, LOG, LOG);
        let r = log.find_active(guid).unwrap().unwrap();
        assert_eq!(
            r.ops,
            vec![Op::Data {
                offset: 2 << 20,
                sector: a.clone()
            }]
        );
        assert!(
            log.find_active(Guid([8; 16])).unwrap().is_none(),
            "other GUID"
        );
        // A damaged entry is not valid.
        s.write_all_at(&[0x55], LOG + 4096 + 100).unwrap();
        assert!(log.find_active(guid).unwrap().is_none());
    }

    #[test]
    fn highest_sequence_wins_and_tail_selects_start() {
        let guid = Guid([7; 16]);
        let s = MemStorage::new(vec![0u8; 3 << 20]);
        let (a, b, c) = (sector(1), sector(2), sector(3));
        // Old sequence near the end of the log: seq 3.
        let old = encode_entry(guid, 3, 512 * 1024, 3 << 20, &[(2 << 20, &c)]);
        s.write_all_at(&old, LOG + 512 * 1024).unwrap();
        // Active sequence at 0: seq 10 (tail 0), seq 11 with tail pointing at seq 11 itself.
        let e1 = encode_entry(guid, 10, 0, 3 << 20, &[(2 << 20, &a)]);
        let e2 = encode_entry(
            guid,
            11,
            e1.len() as u64,
            3 << 20,
            &[(2 << 20, &b), (2 << 20, &a)],
        );
        s.write_all_at(&e1, LOG).unwrap();
        s.write_all_at(&e2, LOG + e1.len() as u64).unwrap();
        let r = Log::new(&s, LOG, LOG).find_active(guid).unwrap().unwrap();
        assert_eq!(r.entries, 1);
        assert_eq!(r.ops.len(), 2);
        // With tail 0 in the head, both entries replay.
        let e2 = encode_entry(guid, 11, 0, 3 << 20, &[(2 << 20, &b)]);
        s.write_all_at(&e2, LOG + e1.len() as u64).unwrap();
        let r = Log::new(&s, LOG, LOG).find_active(guid).unwrap().unwrap();
        assert_eq!(r.entries, 2);
    }

    #[test]
    fn entry_wrapping_around_the_end_of_the_log() {
        let guid = Guid([6; 16]);
        let s = MemStorage::new(vec![0u8; 3 << 20]);
        let (a, b) = (sector(1), sector(2));
        // Three sectors (descriptors, two data) starting at the last log sector.
        let tail = LOG - 4096;
        let e = encode_entry(
            guid,
            9,
            tail,
            3 << 20,
            &[(2 << 20, &a), ((2 << 20) + 4096, &b)],
        );
        assert_eq!(e.len(), 3 * 4096);
        s.write_all_at(&e[..4096], LOG + tail).unwrap();
        s.write_all_at(&e[4096..], LOG).unwrap();
        let r = Log::new(&s, LOG, LOG).find_active(guid).unwrap().unwrap();
        assert_eq!(
            r.ops,
            vec![
                Op::Data {
                    offset: 2 << 20,
                    sector: a
                },
                Op::Data {
                    offset: (2 << 20) + 4096,
                    sector: b
                }
            ]
        );
    }

    #[test]
    fn overlay_applies_in_order() {
        let base = MemStorage::new(vec![1u8; 3 * 4096]);
        let replay = Replay {
            ops: vec![
                Op::Zero {
                    offset: 0,
                    length: 8192,
                },
                Op::Data {
                    offset: 4096,
                    sector: vec![5u8; 4096],
                },
                Op::Data {
                    offset: 3 * 4096,
                    sector: vec![6u8; 4096],
                },
            ],
            flushed_file_offset: 0,
            last_file_offset: 5 * 4096,
            entries: 1,
        };
        let o = Overlay::new(Box::new(base), replay).unwrap();
        assert_eq!(o.len().unwrap(), 5 * 4096);
        let mut buf = vec![0xFFu8; 5 * 4096];
        o.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..8192].iter().all(|&x| x == 5));
        assert!(buf[8192..12288].iter().all(|&x| x == 1));
        assert!(buf[12288..16384].iter().all(|&x| x == 6));
        assert!(buf[16384..].iter().all(|&x| x == 0));
    }

    #[test]
    fn capacity_fits() {
        assert_eq!(capacity(1 << 20), 254);
        let n = capacity(1 << 20) as u64;
        assert!(((n + 2).div_ceil(128) + n) * SECTOR <= 1 << 20);
    }
}
