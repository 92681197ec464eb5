//! HTTP/2 frame and HPACK helpers shared by the adapter's tests.
#![allow(dead_code, clippy::unwrap_used)]

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const HEADERS: u8 = 0x1;
pub const CONTINUATION: u8 = 0x9;
pub const DATA: u8 = 0x0;
pub const SETTINGS: u8 = 0x4;
pub const RST_STREAM: u8 = 0x3;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;

pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One frame: 9-byte header then payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// Splits a byte stream (without preface) into frames; panics on a truncated one.
pub fn parse_frames(mut b: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        out.push(Frame {
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]),
            payload: b[9..9 + len].to_vec(),
        });
        b = &b[9 + len..];
    }
    out
}

/// HPACK header blocks of the HEADERS(+CONTINUATION) sequences in `frames`, decoded by a decoder whose
/// dynamic table has size 0: any use of indexing in the output would fail to decode.
pub fn decode_blocks(frames: &[Frame]) -> Vec<(u32, u8, Fields)> {
    let mut dec = loona_hpack::Decoder::new();
    dec.set_max_table_size(0);
    let mut out = Vec::new();
    let mut open: Option<(u32, u8, Vec<u8>)> = None;
    for f in frames {
        match f.kind {
            HEADERS => {
                assert!(open.is_none(), "HEADERS inside a header block");
                assert_eq!(f.flags & PADDED, 0, "output is never padded");
                let body = if f.flags & PRIORITY != 0 {
                    &f.payload[5..]
                } else {
                    &f.payload[..]
                };
                assert!(f.payload.len() <= 16_384, "frame over the default max size");
                open = Some((f.stream, f.flags, body.to_vec()));
            }
            CONTINUATION => {
                let o = open.as_mut().expect("CONTINUATION without HEADERS");
                assert_eq!(o.0, f.stream);
                assert!(f.payload.len() <= 16_384);
                o.2.extend_from_slice(&f.payload);
            }
            _ => {
                assert!(open.is_none(), "frame inside a header block");
                continue;
            }
        }
        if f.flags & END_HEADERS != 0 {
            let (stream, flags, block) = open.take().unwrap();
            out.push((stream, flags, dec.decode(&block).expect("output decodes")));
        }
    }
    assert!(open.is_none(), "unterminated header block");
    out
}

pub fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

/// A gRPC request's header list with `authority`.
pub fn grpc_request(authority: &str, path: &str) -> Fields {
    fields(&[
        (":scheme", "http"),
        (":method", "POST"),
        (":authority", authority),
        (":path", path),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        (
            "user-agent",
            "grpc-python/1.85.1 grpc-c/50.0.0 (linux; chttp2)",
        ),
    ])
}

/// `fields` with every `:authority` that is not a valid URI authority replaced by `localhost`.
pub fn expected(fields: &Fields) -> Fields {
    fields
        .iter()
        .map(|(n, v)| {
            if n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err() {
                (n.clone(), b"localhost".to_vec())
            } else {
                (n.clone(), v.clone())
            }
        })
        .collect()
}

/// Feeds `input` to a fresh normalizer in pieces of `chunk` bytes.
pub fn run(input: &[u8], chunk: usize) -> Result<Vec<u8>, sigil_h2_authority::Error> {
    let mut n = sigil_h2_authority::Normalizer::new();
    let mut out = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        n.feed(piece, &mut out)?;
    }
    Ok(out)
}
