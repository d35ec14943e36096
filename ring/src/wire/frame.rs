//! Frames: the records carried in a ring (PROTOCOL.md §4).
//!
//! A record is a 16-byte header and a payload padded to 16 bytes. The header is copied
//! out of the ring and checked here before any byte of the payload is looked at.

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 16;

/// What a frame means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Filler up to the ring's end; the next record starts at offset 0.
    Pad = 0,
    /// Open a session: payload [`OpenArgs`].
    Open = 1,
    /// The session is open: payload [`CreditArgs`] (the acceptor's buffer).
    Accept = 2,
    /// Nobody listens on that port, or the listener is full. No payload.
    Refuse = 3,
    /// Session bytes.
    Data = 4,
    /// The sender will write no more: the receiver reads EOF after the data before it.
    Shutdown = 5,
    /// The sender has closed the session: no more reads or writes from it.
    Close = 6,
    /// The session is broken (a protocol violation): both ends fail with ConnectionReset.
    Reset = 7,
    /// The sender's receive buffer and how much of it it has consumed: [`CreditArgs`].
    Credit = 8,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0 => Kind::Pad,
            1 => Kind::Open,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Data,
            5 => Kind::Shutdown,
            6 => Kind::Close,
            7 => Kind::Reset,
            8 => Kind::Credit,
            _ => return None,
        })
    }

    /// The exact payload length a control frame must have (`None`: any, for Data and Pad).
    fn fixed_len(self) -> Option<u32> {
        match self {
            Kind::Pad | Kind::Data => None,
            Kind::Open | Kind::Accept | Kind::Credit => Some(16),
            Kind::Refuse | Kind::Shutdown | Kind::Close | Kind::Reset => Some(0),
        }
    }
}

/// Data flag: this frame ends a message (message mode).
pub const FLAG_EOR: u8 = 1;

/// A checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What the frame means.
    pub kind: Kind,
    /// [`FLAG_EOR`] or 0.
    pub flags: u8,
    /// Payload bytes that follow the header.
    pub len: u32,
    /// The session the frame belongs to (0 for Pad).
    pub session: u64,
}

/// Why a frame header was rejected. Any of these means the ring is corrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Unknown frame type.
    BadKind(u8),
    /// Reserved bits are set.
    Reserved,
    /// Flags on a frame that takes none, or unknown flags.
    BadFlags(u8),
    /// Payload longer than the frame limit, or a control payload of the wrong size.
    BadLength(u32),
    /// The record runs past what the writer has published, or past the ring's end.
    Overrun,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::BadKind(k) => write!(f, "unknown frame type {k}"),
            FrameError::Reserved => write!(f, "reserved frame bits set"),
            FrameError::BadFlags(x) => write!(f, "bad frame flags {x:#x}"),
            FrameError::BadLength(n) => write!(f, "bad frame length {n}"),
            FrameError::Overrun => write!(f, "frame runs past the published data"),
        }
    }
}

/// Bytes a record with `len` payload bytes takes in the ring.
#[inline]
pub const fn record_len(len: usize) -> usize {
    HEADER_LEN + ((len + 15) & !15)
}

/// A record header as it lies in the ring (PROTOCOL.md §4), integers little-endian.
/// Only ever a copy: bytes are copied out of the ring first, then cast.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WireHeader {
    kind: u8,
    flags: u8,
    reserved: [u8; 2],
    len: u32,
    session: u64,
}

/// The payload of an Open frame as it lies in the ring.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WireOpen {
    port: u32,
    message: u8,
    reserved: [u8; 3],
    buf_alloc: u32,
    reserved2: [u8; 4],
}

/// The payload of Accept and Credit frames as it lies in the ring.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct WireCredit {
    fwd_cnt: u64,
    buf_alloc: u32,
    reserved: [u8; 4],
}

impl Header {
    /// Encodes the header.
    #[inline]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        bytemuck::cast(WireHeader {
            kind: self.kind as u8,
            flags: self.flags,
            reserved: [0; 2],
            len: self.len.to_le(),
            session: self.session.to_le(),
        })
    }

    /// Decodes and checks a header copied out of the ring.
    ///
    /// `max_payload` is the frame limit for this ring; `contiguous` is how many bytes the
    /// writer has published from this record's start without crossing the ring's end. A
    /// Pad record must fill exactly the bytes up to the ring's end (`to_end`).
    #[inline]
    pub fn decode(
        b: &[u8; HEADER_LEN],
        max_payload: usize,
        contiguous: usize,
        to_end: usize,
    ) -> Result<Header, FrameError> {
        let w: WireHeader = bytemuck::cast(*b);
        let kind = Kind::from_u8(w.kind).ok_or(FrameError::BadKind(w.kind))?;
        let flags = w.flags;
        if w.reserved != [0; 2] {
            return Err(FrameError::Reserved);
        }
        let len = u32::from_le(w.len);
        let session = u64::from_le(w.session);
        match kind {
            Kind::Data if flags & !FLAG_EOR != 0 => return Err(FrameError::BadFlags(flags)),
            Kind::Data => {}
            _ if flags != 0 => return Err(FrameError::BadFlags(flags)),
            _ => {}
        }
        match kind.fixed_len() {
            Some(n) if n != len => return Err(FrameError::BadLength(len)),
            None if kind == Kind::Data && len as usize > max_payload => {
                return Err(FrameError::BadLength(len))
            }
            _ => {}
        }
        if kind == Kind::Pad {
            if len as usize + HEADER_LEN != to_end || session != 0 {
                return Err(FrameError::BadLength(len));
            }
            if to_end > contiguous {
                return Err(FrameError::Overrun);
            }
        } else if record_len(len as usize) > contiguous {
            return Err(FrameError::Overrun);
        }
        Ok(Header {
            kind,
            flags,
            len,
            session,
        })
    }
}

/// Payload of an Open frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenArgs {
    /// The port the opener connects to.
    pub port: u32,
    /// Message mode (boundaries kept) rather than stream.
    pub message: bool,
    /// The opener's receive buffer for this session.
    pub buf_alloc: u32,
}

impl OpenArgs {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; 16] {
        bytemuck::cast(WireOpen {
            port: self.port.to_le(),
            message: self.message as u8,
            reserved: [0; 3],
            buf_alloc: self.buf_alloc.to_le(),
            reserved2: [0; 4],
        })
    }
    /// Decodes a payload copied out of the ring; `None` if a reserved byte is set.
    pub fn decode(b: &[u8; 16]) -> Option<OpenArgs> {
        let w: WireOpen = bytemuck::cast(*b);
        if w.message > 1 || w.reserved != [0; 3] || w.reserved2 != [0; 4] {
            return None;
        }
        Some(OpenArgs {
            port: u32::from_le(w.port),
            message: w.message == 1,
            buf_alloc: u32::from_le(w.buf_alloc),
        })
    }
}

/// Payload of Accept and Credit frames (virtio-vsock's buf_alloc and fwd_cnt).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditArgs {
    /// Total bytes the sender has consumed from this session (free-running).
    pub fwd_cnt: u64,
    /// The sender's receive buffer for this session.
    pub buf_alloc: u32,
}

impl CreditArgs {
    /// Encodes the payload.
    pub fn encode(&self) -> [u8; 16] {
        bytemuck::cast(WireCredit {
            fwd_cnt: self.fwd_cnt.to_le(),
            buf_alloc: self.buf_alloc.to_le(),
            reserved: [0; 4],
        })
    }
    /// Decodes a payload copied out of the ring; `None` if a reserved byte is set.
    pub fn decode(b: &[u8; 16]) -> Option<CreditArgs> {
        let w: WireCredit = bytemuck::cast(*b);
        if w.reserved != [0; 4] {
            return None;
        }
        Some(CreditArgs {
            fwd_cnt: u64::from_le(w.fwd_cnt),
            buf_alloc: u32::from_le(w.buf_alloc),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        (0u8..=8).prop_map(|k| Kind::from_u8(k).unwrap())
    }

    proptest! {
        /// Every header the writer can produce decodes to itself.
        #[test]
        fn header_round_trip(k in kind(), eor in any::<bool>(), len in 0u32..70000, session in any::<u64>()) {
            let len = k.fixed_len().unwrap_or(len.min(65520));
            let len = if k == Kind::Pad { len & !15 } else { len };
            let flags = if k == Kind::Data && eor { FLAG_EOR } else { 0 };
            let session = if k == Kind::Pad { 0 } else { session };
            let h = Header { kind: k, flags, len, session };
            let rec = record_len(len as usize);
            let to_end = if k == Kind::Pad { rec } else { 1 << 20 };
            prop_assert_eq!(Header::decode(&h.encode(), 65520, 1 << 20, to_end), Ok(h));
        }

        /// No 16 bytes make decode panic, and whatever it accepts lies inside what was
        /// published and within the frame limit.
        #[test]
        fn header_garbage(b in any::<[u8; 16]>(), contiguous in 0usize..100000, to_end in 16usize..100000) {
            if let Ok(h) = Header::decode(&b, 4096, contiguous, to_end) {
                if h.kind == Kind::Pad {
                    prop_assert!(to_end <= contiguous);
                } else {
                    prop_assert!(record_len(h.len as usize) <= contiguous);
                    prop_assert!(h.len as usize <= 4096 || h.kind != Kind::Data);
                }
            }
        }

        #[test]
        fn open_round_trip(port in any::<u32>(), message in any::<bool>(), buf_alloc in any::<u32>()) {
            let a = OpenArgs { port, message, buf_alloc };
            prop_assert_eq!(OpenArgs::decode(&a.encode()), Some(a));
        }

        #[test]
        fn credit_round_trip(fwd_cnt in any::<u64>(), buf_alloc in any::<u32>()) {
            let a = CreditArgs { fwd_cnt, buf_alloc };
            prop_assert_eq!(CreditArgs::decode(&a.encode()), Some(a));
        }
    }

    /// The bytes of PROTOCOL.md §4, field by field.
    #[test]
    fn wire_bytes() {
        let h = Header {
            kind: Kind::Data,
            flags: FLAG_EOR,
            len: 0x0403_0201,
            session: 0x0c0b_0a09_0807_0605,
        };
        assert_eq!(
            h.encode(),
            [4, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
        );
        let open = OpenArgs {
            port: 0x0403_0201,
            message: true,
            buf_alloc: 0x0807_0605,
        };
        assert_eq!(
            open.encode(),
            [1, 2, 3, 4, 1, 0, 0, 0, 5, 6, 7, 8, 0, 0, 0, 0]
        );
        let credit = CreditArgs {
            fwd_cnt: 0x0807_0605_0403_0201,
            buf_alloc: 0x0c0b_0a09,
        };
        assert_eq!(
            credit.encode(),
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0, 0]
        );
    }

    #[test]
    fn rejects() {
        let data = |len| {
            Header {
                kind: Kind::Data,
                flags: 0,
                len,
                session: 5,
            }
            .encode()
        };
        assert_eq!(
            Header::decode(&data(4097), 4096, 1 << 20, 1 << 20),
            Err(FrameError::BadLength(4097))
        );
        assert_eq!(
            Header::decode(&data(100), 4096, 100, 1 << 20),
            Err(FrameError::Overrun)
        );
        let mut b = data(1);
        b[0] = 99;
        assert_eq!(
            Header::decode(&b, 4096, 1 << 20, 1 << 20),
            Err(FrameError::BadKind(99))
        );
        let mut b = data(1);
        b[2] = 1;
        assert_eq!(
            Header::decode(&b, 4096, 1 << 20, 1 << 20),
            Err(FrameError::Reserved)
        );
        let pad = Header {
            kind: Kind::Pad,
            flags: 0,
            len: 32,
            session: 0,
        }
        .encode();
        assert!(Header::decode(&pad, 4096, 1 << 20, 48).is_ok());
        assert_eq!(
            Header::decode(&pad, 4096, 1 << 20, 64),
            Err(FrameError::BadLength(32))
        );
        let close = Header {
            kind: Kind::Close,
            flags: 0,
            len: 16,
            session: 5,
        }
        .encode();
        assert_eq!(
            Header::decode(&close, 4096, 1 << 20, 1 << 20),
            Err(FrameError::BadLength(16))
        );
    }

    /// Flags a frame may not carry, reserved bytes in an Open payload, and what each error
    /// says (the message is what `Stats::last_error` and the logs show).
    #[test]
    fn rejects_flags_and_reserved_payload_bytes_and_says_what() {
        let hdr = |kind, flags, len| {
            Header {
                kind,
                flags,
                len,
                session: 5,
            }
            .encode()
        };
        let decode = |b: &[u8; HEADER_LEN]| Header::decode(b, 4096, 1 << 20, 1 << 20);
        assert!(decode(&hdr(Kind::Data, FLAG_EOR, 8)).is_ok());
        assert_eq!(
            decode(&hdr(Kind::Data, FLAG_EOR | 2, 8)),
            Err(FrameError::BadFlags(FLAG_EOR | 2))
        );
        assert_eq!(
            decode(&hdr(Kind::Close, FLAG_EOR, 0)),
            Err(FrameError::BadFlags(FLAG_EOR))
        );
        assert!(decode(&hdr(Kind::Close, 0, 0)).is_ok());

        let open = OpenArgs {
            port: 7,
            message: true,
            buf_alloc: 4096,
        }
        .encode();
        assert!(OpenArgs::decode(&open).is_some());
        // Each of the three checks alone must refuse the payload.
        let mut bad_mode = open;
        bad_mode[4] = 2;
        let mut bad_reserved = open;
        bad_reserved[5] = 1;
        let mut bad_reserved2 = open;
        bad_reserved2[12] = 1;
        for (what, b) in [
            ("mode", bad_mode),
            ("reserved", bad_reserved),
            ("reserved2", bad_reserved2),
        ] {
            assert_eq!(OpenArgs::decode(&b), None, "{what} byte set");
        }

        for (e, says) in [
            (FrameError::BadKind(99), "type 99"),
            (FrameError::Reserved, "reserved"),
            (FrameError::BadFlags(2), "flags 0x2"),
            (FrameError::BadLength(4097), "length 4097"),
            (FrameError::Overrun, "past the published"),
        ] {
            assert!(e.to_string().contains(says), "{e:?}: {e}");
        }
    }
}
