//! Makes HTTP/2 requests on local sockets acceptable to `h2` whatever `:authority` the client sends.
//!
//! gRPC clients built on C-core (Python `grpcio`, C++, Ruby, PHP) and grpc-java send the socket path as the
//! `:authority` of a request on a Unix socket (`tmp%2Fagent.sock`, `/run/x.sock`). `h2` parses `:authority`
//! as a URI authority and resets any stream whose value does not parse, so every such call fails before tonic
//! sees it. [`AuthorityNormalizer`] wraps an accepted stream and rewrites the client's header blocks on their
//! way to `h2`: an `:authority` that is not a valid URI authority becomes `localhost`, everything else is
//! kept. The authority means nothing on a local socket (tonic ignores it; callers are identified by their
//! peer credentials), so nothing is lost.
//!
//! Header blocks are HPACK-decoded with a table that follows the client's encoder, and re-encoded as
//! literals without indexing (HPACK's `0000` prefix), so `h2`'s decoder table stays empty and consistent
//! whatever the client did. Every other frame, and all bytes from server to client, pass through unchanged.
#![forbid(unsafe_code)]

mod io;
mod normalize;

pub use io::{AuthorityNormalizer, normalize_incoming};
pub use normalize::{
    MAX_CONTINUATIONS, MAX_FRAME_PAYLOAD, MAX_HEADER_BLOCK, Normalizer, REPLACEMENT_AUTHORITY,
};

/// Why a client's byte stream cannot be passed on to the HTTP/2 server; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first bytes are not the HTTP/2 client connection preface.
    #[error("not an HTTP/2 connection: the connection preface is wrong at byte {offset}")]
    BadPreface {
        /// Offset of the first byte that differs.
        offset: usize,
    },
    /// A header block (HEADERS plus CONTINUATION frames) is larger than this adapter buffers.
    #[error("header block on stream {stream} is {size} bytes, more than the limit of {limit}")]
    HeaderBlockTooLarge {
        /// Stream the block belongs to.
        stream: u32,
        /// Size reached (encoded, or decoded as HPACK counts it).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A header block is split over more CONTINUATION frames than any real client uses.
    #[error("header block on stream {stream} has more than {limit} CONTINUATION frames")]
    TooManyContinuations {
        /// Stream the block belongs to.
        stream: u32,
        /// The limit.
        limit: usize,
    },
    /// A frame other than CONTINUATION on the same stream interrupted a header block.
    #[error(
        "header block on stream {stream} interrupted by a frame of type {frame_type} on stream {frame_stream}"
    )]
    InterruptedHeaderBlock {
        /// Stream whose header block was open.
        stream: u32,
        /// Type of the interrupting frame.
        frame_type: u8,
        /// Stream of the interrupting frame.
        frame_stream: u32,
    },
    /// A CONTINUATION frame arrived with no header block open.
    #[error("CONTINUATION frame on stream {stream} without an open header block")]
    UnexpectedContinuation {
        /// Stream of the frame.
        stream: u32,
    },
    /// A HEADERS frame whose padding or priority fields do not fit its length.
    #[error("HEADERS frame on stream {stream} is malformed: {reason}")]
    BadHeadersFrame {
        /// Stream of the frame.
        stream: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// A HEADERS or CONTINUATION frame longer than the SETTINGS_MAX_FRAME_SIZE the server advertises
    /// (the default, 16 384): HTTP/2's FRAME_SIZE_ERROR.
    #[error(
        "frame of type {frame_type} on stream {stream} is {len} bytes, more than the maximum frame size {limit}"
    )]
    FrameTooLarge {
        /// Stream of the frame.
        stream: u32,
        /// Frame type (1 HEADERS, 9 CONTINUATION).
        frame_type: u8,
        /// Its payload length.
        len: usize,
        /// The maximum frame size.
        limit: usize,
    },
    /// An earlier error already closed this connection.
    #[error("the connection was closed after an earlier error")]
    Closed,
    /// The header block is not valid HPACK.
    #[error("header block on stream {stream} is not valid HPACK: {reason}")]
    Hpack {
        /// Stream of the block.
        stream: u32,
        /// The decoder's description (kept as text: the decoder's error type is not `std::error::Error`).
        reason: String,
    },
}
