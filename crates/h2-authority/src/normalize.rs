//! The byte-level rewriter: client bytes in, bytes `h2` accepts out, with no I/O of its own.

use loona_hpack::Decoder;

use crate::Error;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The largest frame payload `h2` accepts unless it advertised more: SETTINGS_MAX_FRAME_SIZE's initial
/// value, which tonic and hyper leave as is.
pub const MAX_FRAME_PAYLOAD: usize = 16_384;
/// HPACK's dynamic table size limit: SETTINGS_HEADER_TABLE_SIZE's initial value. tonic offers no way to
/// change what h2 advertises, so a client's encoder may use at most this much; a size update above it is an
/// HPACK error for h2 as for us.
const HEADER_TABLE_SIZE: usize = 4_096;
/// HPACK's per-entry overhead when sizing a header list (RFC 7541 §4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The most a header block may hold, both as received (HPACK-encoded, over all its frames) and decoded
/// (names plus values plus 32 per field, as HPACK counts). hyper asks clients for 16 KiB at most, so a larger
/// block is hostile or broken; the connection is closed.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// The most CONTINUATION frames one header block may have. Empty CONTINUATION frames would otherwise keep
/// a connection busy without ever reaching `h2`, which refuses such floods itself (RUSTSEC-2024-0332).
pub const MAX_CONTINUATIONS: usize = 128;

/// What an `:authority` that `h2` would reject becomes.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the 24-byte connection preface.
    Preface,
    /// Reading a 9-byte frame header.
    FrameHeader,
    /// Copying the payload of a frame that is not part of a header block.
    Passthrough { remaining: usize },
    /// Gathering the payload of a HEADERS or CONTINUATION frame.
    HeaderPayload(FrameHeader),
    /// A previous error closed the stream.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(b: &[u8]) -> FrameHeader {
        FrameHeader {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5] & 0x7f, b[6], b[7], b[8]]),
        }
    }
}

/// A header block being gathered from a HEADERS frame and its CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    continuations: usize,
}

/// Rewrites a client's HTTP/2 byte stream so that every `:authority` is one `h2` accepts.
///
/// Feed it the bytes as they arrive with [`Normalizer::feed`]; it appends what to hand to the server. After
/// an error it refuses all further input.
pub struct Normalizer {
    state: State,
    /// Bytes of the preface, frame header or header frame payload read so far.
    pending: Vec<u8>,
    block: Option<Block>,
    /// Follows the client's encoder: the client may index fields and refer to them in later blocks.
    decoder: Decoder<'static>,
}

impl std::fmt::Debug for Normalizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Normalizer")
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .field("block", &self.block)
            .finish_non_exhaustive()
    }
}

impl Default for Normalizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Normalizer {
    /// A rewriter for a new connection, expecting the connection preface first.
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Normalizer {
            state: State::Preface,
            pending: Vec::new(),
            block: None,
            decoder,
        }
    }

    /// Consumes all of `input`, appending the bytes for the server to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if self.state == State::Failed {
            return Err(Error::Closed);
        }
        while !input.is_empty() {
            match self.step(input, out) {
                Ok(used) => input = &input[used..],
                Err(e) => {
                    self.state = State::Failed;
                    self.pending = Vec::new();
                    self.block = None;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Advances over a prefix of `input`, returning how many bytes it used (at least one).
    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Error> {
        match self.state {
            State::Failed => Err(Error::Closed),
            State::Preface => {
                let start = self.pending.len();
                let used = input.len().min(PREFACE.len() - start);
                for (i, b) in input[..used].iter().enumerate() {
                    if PREFACE[start + i] != *b {
                        return Err(Error::BadPreface { offset: start + i });
                    }
                }
                self.pending.extend_from_slice(&input[..used]);
                if self.pending.len() == PREFACE.len() {
                    out.extend_from_slice(PREFACE);
                    self.pending.clear();
                    self.state = State::FrameHeader;
                }
                Ok(used)
            }
            State::FrameHeader => {
                let used = input.len().min(FRAME_HEADER_LEN - self.pending.len());
                self.pending.extend_from_slice(&input[..used]);
                if self.pending.len() == FRAME_HEADER_LEN {
                    let header = FrameHeader::parse(&self.pending);
                    self.start_frame(&header, out)?;
                }
                Ok(used)
            }
            State::Passthrough { remaining } => {
                let used = input.len().min(remaining);
                out.extend_from_slice(&input[..used]);
                self.state = if used == remaining {
                    State::FrameHeader
                } else {
                    State::Passthrough {
                        remaining: remaining - used,
                    }
                };
                Ok(used)
            }
            State::HeaderPayload(header) => {
                let used = input.len().min(header.len - self.pending.len());
                self.pending.extend_from_slice(&input[..used]);
                if self.pending.len() == header.len {
                    self.header_frame(&header, out)?;
                }
                Ok(used)
            }
        }
    }

    /// Acts on a complete frame header held in `pending`.
    fn start_frame(&mut self, header: &FrameHeader, out: &mut Vec<u8>) -> Result<(), Error> {
        match (&self.block, header.kind) {
            (Some(b), TYPE_CONTINUATION) if b.stream == header.stream => {
                if b.continuations >= MAX_CONTINUATIONS {
                    return Err(Error::TooManyContinuations {
                        stream: b.stream,
                        limit: MAX_CONTINUATIONS,
                    });
                }
            }
            (Some(b), _) => {
                return Err(Error::InterruptedHeaderBlock {
                    stream: b.stream,
                    frame_type: header.kind,
                    frame_stream: header.stream,
                });
            }
            (None, TYPE_CONTINUATION) => {
                return Err(Error::UnexpectedContinuation {
                    stream: header.stream,
                });
            }
            (None, _) => {}
        }
        if header.kind == TYPE_HEADERS || header.kind == TYPE_CONTINUATION {
            let so_far = self.block.as_ref().map_or(0, |b| b.fragment.len());
            let size = so_far.saturating_add(header.len);
            if size > MAX_HEADER_BLOCK {
                return Err(Error::HeaderBlockTooLarge {
                    stream: header.stream,
                    size,
                    limit: MAX_HEADER_BLOCK,
                });
            }
            // h2 advertises the default SETTINGS_MAX_FRAME_SIZE, so it would refuse a longer frame with
            // FRAME_SIZE_ERROR; re-splitting it here would hide that from h2.
            if header.len > MAX_FRAME_PAYLOAD {
                return Err(Error::FrameTooLarge {
                    stream: header.stream,
                    frame_type: header.kind,
                    len: header.len,
                    limit: MAX_FRAME_PAYLOAD,
                });
            }
            self.pending.clear();
            if header.len == 0 {
                self.header_frame(header, out)?;
            } else {
                self.state = State::HeaderPayload(*header);
            }
            return Ok(());
        }
        out.extend_from_slice(&self.pending);
        self.pending.clear();
        self.state = if header.len == 0 {
            State::FrameHeader
        } else {
            State::Passthrough {
                remaining: header.len,
            }
        };
        Ok(())
    }

    /// Acts on a complete HEADERS or CONTINUATION payload held in `pending`.
    fn header_frame(&mut self, header: &FrameHeader, out: &mut Vec<u8>) -> Result<(), Error> {
        let payload = std::mem::take(&mut self.pending);
        self.state = State::FrameHeader;
        if header.kind == TYPE_HEADERS {
            let mut body = &payload[..];
            let mut pad = 0;
            if header.flags & FLAG_PADDED != 0 {
                let (&len, rest) = body.split_first().ok_or(Error::BadHeadersFrame {
                    stream: header.stream,
                    reason: "PADDED flag set on an empty frame",
                })?;
                pad = usize::from(len);
                body = rest;
            }
            let mut priority = None;
            if header.flags & FLAG_PRIORITY != 0 {
                let (fields, rest) =
                    body.split_first_chunk::<5>()
                        .ok_or(Error::BadHeadersFrame {
                            stream: header.stream,
                            reason: "PRIORITY flag set but the priority fields are missing",
                        })?;
                priority = Some(*fields);
                body = rest;
            }
            if pad > body.len() {
                return Err(Error::BadHeadersFrame {
                    stream: header.stream,
                    reason: "padding is longer than the frame",
                });
            }
            self.block = Some(Block {
                stream: header.stream,
                end_stream: header.flags & FLAG_END_STREAM != 0,
                priority,
                fragment: body[..body.len() - pad].to_vec(),
                continuations: 0,
            });
        } else if let Some(block) = &mut self.block {
            block.fragment.extend_from_slice(&payload);
            block.continuations += 1;
        }
        if header.flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.emit(block, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block, fixes `:authority`, and writes it as HEADERS + CONTINUATION frames.
    fn emit(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        let mut decoded_size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                decoded_size = decoded_size
                    .saturating_add(name.len() + value.len())
                    .saturating_add(ENTRY_OVERHEAD);
                if decoded_size > MAX_HEADER_BLOCK {
                    return;
                }
                let value: &[u8] = if &name[..] == b":authority" && !valid_authority(&value) {
                    REPLACEMENT_AUTHORITY
                } else {
                    &value
                };
                encode_literal(&name, value, &mut encoded);
            })
            .map_err(|e| Error::Hpack {
                stream: block.stream,
                reason: e.to_string(),
            })?;
        if decoded_size > MAX_HEADER_BLOCK {
            return Err(Error::HeaderBlockTooLarge {
                stream: block.stream,
                size: decoded_size,
                limit: MAX_HEADER_BLOCK,
            });
        }
        write_header_frames(&block, &encoded, out);
        Ok(())
    }
}

/// Whether `h2` accepts `value` as `:authority`; the same parser it uses.
fn valid_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing, new name" (RFC 7541 §6.2.2), strings not Huffman-coded.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    encode_string(name, out);
    encode_string(value, out);
}

/// An HPACK string literal: length as a 7-bit-prefix integer (RFC 7541 §5.1), then the octets.
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    let mut len = s.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len & 0x7f) as u8 | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

/// Writes `block`'s fields as one HEADERS frame and as many CONTINUATION frames as the size limit needs.
fn write_header_frames(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let prio_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - prio_len);
    let (first, mut rest) = encoded.split_at(first_len);
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame_header(
        first.len() + prio_len,
        TYPE_HEADERS,
        flags,
        block.stream,
        out,
    );
    if let Some(p) = &block.priority {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame_header(chunk.len(), TYPE_CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(chunk);
    }
}

fn write_frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    // `len` is at most MAX_FRAME_PAYLOAD, far below the 24-bit field's limit.
    let len = len as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
}
