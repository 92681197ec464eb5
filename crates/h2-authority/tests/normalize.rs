//! The rewriter against hand-made and reference-encoded (loona-hpack, with dynamic-table indexing) client
//! byte streams: what comes out is valid HTTP/2 whose header blocks decode without any dynamic table and
//! carry the same fields, with only an invalid `:authority` changed.
#![allow(clippy::unwrap_used)]

#[path = "support/frames.rs"]
mod support;

use proptest::prelude::*;
use sigil_h2_authority::{
    Error, MAX_CONTINUATIONS, MAX_FRAME_PAYLOAD, MAX_HEADER_BLOCK, Normalizer,
};
use support::*;

/// A client stream: preface, empty SETTINGS, then `frames`.
fn client(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut b = PREFACE.to_vec();
    b.extend(frame(SETTINGS, 0, 0, &[]));
    for f in frames {
        b.extend_from_slice(f);
    }
    b
}

/// Runs `input` through a fresh normalizer (whole, and one byte at a time: both must agree) and returns the
/// frames after the preface.
fn normalized(input: &[u8]) -> Vec<Frame> {
    let whole = run(input, input.len()).unwrap();
    let bytewise = run(input, 1).unwrap();
    assert_eq!(whole, bytewise, "output depends on how input is split");
    assert_eq!(&whole[..PREFACE.len()], PREFACE);
    parse_frames(&whole[PREFACE.len()..])
}

fn encode(enc: &mut loona_hpack::Encoder<'_>, f: &Fields) -> Vec<u8> {
    enc.encode(f.iter().map(|(n, v)| (&n[..], &v[..])))
}

#[test]
fn c_core_authorities_become_localhost_and_valid_ones_stay() {
    let cases = [
        ("tmp%2Fsigil-agent%2Fpublic%2Fapi.sock", "localhost"),
        ("/run/sigil/netd.sock", "localhost"),
        ("", "localhost"),
        ("a b", "localhost"),
        ("localhost", "localhost"),
        ("localhost:8081", "localhost:8081"),
        ("api.sock", "api.sock"),
        ("[::1]:50051", "[::1]:50051"),
    ];
    for (sent, want) in cases {
        let mut enc = loona_hpack::Encoder::new();
        let block = encode(&mut enc, &grpc_request(sent, "/a.B/C"));
        let out = normalized(&client(&[frame(HEADERS, END_HEADERS, 1, &block)]));
        let blocks = decode_blocks(&out);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].2, grpc_request(want, "/a.B/C"), "sent {sent:?}");
        assert_eq!(blocks[0].1, END_HEADERS);
    }
}

#[test]
fn authority_indexed_in_the_clients_table_is_rewritten_on_every_later_request() {
    // As C-core does: the first request adds `:authority` to its dynamic table (literal with incremental
    // indexing, name from static index 1), later requests refer to dynamic index 62.
    let path = b"/run/x.sock";
    let mut first = vec![0x83, 0x86, 0x41, path.len() as u8];
    first.extend_from_slice(path);
    let second = vec![0x83, 0x86, 0xbe];
    let third = vec![0xbe, 0x83];
    let out = normalized(&client(&[
        frame(HEADERS, END_HEADERS, 1, &first),
        frame(HEADERS, END_HEADERS | END_STREAM, 3, &second),
        frame(HEADERS, END_HEADERS, 5, &third),
    ]));
    let blocks = decode_blocks(&out);
    let want = fields(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "localhost"),
    ]);
    assert_eq!(blocks[0].2, want);
    assert_eq!(blocks[1].2, want);
    assert_eq!(blocks[1].1, END_HEADERS | END_STREAM);
    assert_eq!(
        blocks[2].2,
        fields(&[(":authority", "localhost"), (":method", "POST")])
    );
    assert_eq!(
        blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![1, 3, 5]
    );
}

#[test]
fn huffman_coded_fields_are_decoded() {
    // RFC 7541 C.4.1: GET http / with :authority www.example.com, Huffman-coded.
    let block = [
        0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90,
        0xf4, 0xff,
    ];
    let blocks = decode_blocks(&normalized(&client(&[frame(
        HEADERS,
        END_HEADERS,
        1,
        &block,
    )])));
    assert_eq!(
        blocks[0].2,
        fields(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ])
    );
}

#[test]
fn table_size_update_evicts_the_clients_entries() {
    let mut first = vec![0x41, 3];
    first.extend_from_slice(b"/x/");
    // Size update to 0 (evicts everything), back to 4096, then a reference to the evicted entry.
    let second = vec![0x20, 0x3f, 0xe1, 0x1f, 0xbe];
    let input = client(&[
        frame(HEADERS, END_HEADERS, 1, &first),
        frame(HEADERS, END_HEADERS, 3, &second),
    ]);
    let err = run(&input, input.len()).unwrap_err();
    assert!(
        matches!(err, Error::Hpack { stream: 3, .. }),
        "{err:?}: {err}"
    );

    // A size update alone, then a fresh literal, is fine and the update is not forwarded.
    let third = vec![0x20, 0x82];
    let blocks = decode_blocks(&normalized(&client(&[
        frame(HEADERS, END_HEADERS, 1, &first),
        frame(HEADERS, END_HEADERS, 3, &third),
    ])));
    assert_eq!(blocks[1].2, fields(&[(":method", "GET")]));
}

#[test]
fn table_size_update_above_the_servers_limit_is_refused() {
    // 0x3f 0xe2 0x1f = 32 + 4065 = 4097 > SETTINGS_HEADER_TABLE_SIZE's 4096.
    let input = client(&[frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe2, 0x1f, 0x82])]);
    assert!(matches!(
        run(&input, 7).unwrap_err(),
        Error::Hpack { stream: 1, .. }
    ));
}

#[test]
fn padding_is_dropped_and_priority_kept() {
    let mut enc = loona_hpack::Encoder::new();
    let block = encode(&mut enc, &grpc_request("/p.sock", "/a/b"));
    let mut payload = vec![4u8]; // pad length
    payload.extend_from_slice(&[0x80, 0, 0, 3, 15]); // exclusive, depends on 3, weight 15
    payload.extend_from_slice(&block);
    payload.extend_from_slice(&[0; 4]);
    let out = normalized(&client(&[frame(
        HEADERS,
        END_HEADERS | PADDED | PRIORITY | END_STREAM,
        7,
        &payload,
    )]));
    let h = out.iter().find(|f| f.kind == HEADERS).unwrap();
    assert_eq!(h.flags, END_HEADERS | PRIORITY | END_STREAM);
    assert_eq!(&h.payload[..5], &[0x80, 0, 0, 3, 15]);
    assert_eq!(decode_blocks(&out)[0].2, grpc_request("localhost", "/a/b"));
}

#[test]
fn continuation_frames_are_gathered_and_large_blocks_split_again() {
    let mut list = grpc_request("/c.sock", "/svc/M");
    // 20 KiB of metadata: more than one 16 KiB frame when re-encoded.
    for i in 0..20 {
        list.push((format!("x-meta-{i}").into_bytes(), vec![b'v'; 1000]));
    }
    let mut enc = loona_hpack::Encoder::new();
    let block = encode(&mut enc, &list);
    let (a, rest) = block.split_at(3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let out = normalized(&client(&[
        frame(HEADERS, END_STREAM, 9, a),
        frame(CONTINUATION, 0, 9, b),
        frame(CONTINUATION, END_HEADERS, 9, c),
        frame(DATA, END_STREAM, 11, b"after"),
    ]));
    let kinds: Vec<_> = out.iter().map(|f| (f.kind, f.flags)).collect();
    assert_eq!(
        kinds,
        vec![
            (SETTINGS, 0),
            (HEADERS, END_STREAM),
            (CONTINUATION, END_HEADERS),
            (DATA, END_STREAM),
        ]
    );
    assert_eq!(decode_blocks(&out)[0].2, expected(&list));
    assert_eq!(out[3].payload, b"after");
}

#[test]
fn other_frames_pass_through_unchanged() {
    let frames = vec![
        frame(SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]),
        frame(SETTINGS, 1, 0, &[]),
        frame(0x8, 0, 0, &[0, 0, 1, 0]),   // WINDOW_UPDATE
        frame(0x6, 0, 0, &[7; 8]),         // PING
        frame(DATA, 0, 1, &[0xab; 40000]), // larger than any buffer
        frame(0x7, 0, 0, &[0; 8]),         // GOAWAY
        frame(0xfe, 0x55, 3, b"unknown"),  // unknown types are h2's business
    ];
    let mut input = PREFACE.to_vec();
    for f in &frames {
        input.extend_from_slice(f);
    }
    for chunk in [1, 9, 10, 4096, input.len()] {
        assert_eq!(run(&input, chunk).unwrap(), input, "chunk {chunk}");
    }
}

#[test]
fn hostile_inputs_close_the_connection() {
    let ok_block = [0x82];
    type Case = (&'static str, Vec<u8>, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        (
            "HTTP/1.1 instead of the preface",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            |e| matches!(e, Error::BadPreface { offset: 0 }),
        ),
        (
            "CONTINUATION without HEADERS",
            client(&[frame(CONTINUATION, END_HEADERS, 1, &ok_block)]),
            |e| matches!(e, Error::UnexpectedContinuation { stream: 1 }),
        ),
        (
            "DATA inside a header block",
            client(&[frame(HEADERS, 0, 1, &ok_block), frame(DATA, 0, 1, b"x")]),
            |e| matches!(e, Error::InterruptedHeaderBlock { stream: 1, .. }),
        ),
        (
            "CONTINUATION on another stream",
            client(&[
                frame(HEADERS, 0, 1, &ok_block),
                frame(CONTINUATION, END_HEADERS, 3, &ok_block),
            ]),
            |e| {
                matches!(
                    e,
                    Error::InterruptedHeaderBlock {
                        frame_stream: 3,
                        ..
                    }
                )
            },
        ),
        (
            "padding longer than the frame",
            client(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 0x82])]),
            |e| matches!(e, Error::BadHeadersFrame { .. }),
        ),
        (
            "PADDED on an empty frame",
            client(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[])]),
            |e| matches!(e, Error::BadHeadersFrame { .. }),
        ),
        (
            "PRIORITY without its fields",
            client(&[frame(HEADERS, END_HEADERS | PRIORITY, 1, &[0, 0])]),
            |e| matches!(e, Error::BadHeadersFrame { .. }),
        ),
        (
            "index beyond both tables",
            client(&[frame(HEADERS, END_HEADERS, 1, &[0xff, 0x00])]),
            |e| matches!(e, Error::Hpack { .. }),
        ),
        (
            "index 0",
            client(&[frame(HEADERS, END_HEADERS, 1, &[0x80])]),
            |e| matches!(e, Error::Hpack { .. }),
        ),
        (
            "string longer than the block",
            client(&[frame(HEADERS, END_HEADERS, 1, &[0x00, 0x7f, 0x7f, b'a'])]),
            |e| matches!(e, Error::Hpack { .. }),
        ),
        (
            "integer with too many continuation octets",
            client(&[frame(
                HEADERS,
                END_HEADERS,
                1,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            )]),
            |e| matches!(e, Error::Hpack { .. }),
        ),
        (
            "truncated size update (RUSTSEC-2023-0085's input)",
            client(&[frame(HEADERS, END_HEADERS, 1, &[0x3f])]),
            |e| matches!(e, Error::Hpack { .. }),
        ),
        (
            "Huffman string with EOS",
            client(&[frame(
                HEADERS,
                END_HEADERS,
                1,
                &[0x00, 0x84, 0xff, 0xff, 0xff, 0xff, 0x00],
            )]),
            |e| matches!(e, Error::Hpack { .. }),
        ),
    ];
    for (name, input, want) in cases {
        let mut n = Normalizer::new();
        let mut out = Vec::new();
        let err = n.feed(&input, &mut out).unwrap_err();
        assert!(want(&err), "{name}: got {err:?}");
        // Once failed, always failed.
        assert!(matches!(n.feed(b"x", &mut out).unwrap_err(), Error::Closed));
    }
}

#[test]
fn header_blocks_are_bounded_as_received() {
    // Endless CONTINUATION frames: refused once the block passes the limit, before it is all buffered.
    let chunk = vec![0u8; 16_384];
    let mut frames = vec![frame(HEADERS, 0, 1, &chunk)];
    for _ in 0..(MAX_HEADER_BLOCK / chunk.len()) {
        frames.push(frame(CONTINUATION, 0, 1, &chunk));
    }
    let input = client(&frames);
    let err = run(&input, 4096).unwrap_err();
    assert!(
        matches!(err, Error::HeaderBlockTooLarge { stream: 1, limit, .. } if limit == MAX_HEADER_BLOCK),
        "{err:?}"
    );
    // One oversized frame is refused from its header alone.
    let mut n = Normalizer::new();
    let mut out = Vec::new();
    let mut head = PREFACE.to_vec();
    head.extend_from_slice(&((MAX_HEADER_BLOCK as u32 + 1).to_be_bytes()[1..]));
    head.extend_from_slice(&[HEADERS, END_HEADERS, 0, 0, 0, 1]);
    assert!(matches!(
        n.feed(&head, &mut out).unwrap_err(),
        Error::HeaderBlockTooLarge { .. }
    ));
}

/// A HEADERS or CONTINUATION frame one byte over the maximum frame size h2 advertises closes the
/// connection (h2 would answer FRAME_SIZE_ERROR; re-splitting it would hide that). Control: frames of
/// exactly the maximum size pass.
#[test]
fn header_frames_over_the_maximum_frame_size_are_refused() {
    let over = vec![0u8; MAX_FRAME_PAYLOAD + 1];
    for frames in [
        vec![frame(HEADERS, END_HEADERS, 1, &over)],
        vec![
            frame(HEADERS, 0, 1, &[0u8; 10]),
            frame(CONTINUATION, END_HEADERS, 1, &over),
        ],
    ] {
        let err = run(&client(&frames), 4096).unwrap_err();
        assert!(
            matches!(err, Error::FrameTooLarge { stream: 1, len, limit, .. }
                if len == MAX_FRAME_PAYLOAD + 1 && limit == MAX_FRAME_PAYLOAD),
            "{err:?}"
        );
    }
    // Control: a block whose frames are exactly the maximum size is accepted.
    let mut list = grpc_request("/c.sock", "/svc/M");
    for i in 0..40 {
        list.push((format!("x-meta-{i}").into_bytes(), vec![b'v'; 1000]));
    }
    let mut enc = loona_hpack::Encoder::new();
    let block = encode(&mut enc, &list);
    assert!(block.len() > MAX_FRAME_PAYLOAD);
    let mut frames: Vec<Vec<u8>> = block
        .chunks(MAX_FRAME_PAYLOAD)
        .enumerate()
        .map(|(i, c)| {
            let (kind, flags) = if i == 0 {
                (HEADERS, END_STREAM)
            } else {
                (CONTINUATION, 0)
            };
            frame(kind, flags, 1, c)
        })
        .collect();
    let last = frames.len() - 1;
    frames[last][4] |= END_HEADERS;
    let out = normalized(&client(&frames));
    assert_eq!(decode_blocks(&out)[0].2, expected(&list));
}

#[test]
fn continuation_floods_are_refused() {
    // Empty CONTINUATION frames never grow the block; they are counted instead.
    let mut frames = vec![frame(HEADERS, 0, 1, &[0x82])];
    for _ in 0..MAX_CONTINUATIONS {
        frames.push(frame(CONTINUATION, 0, 1, &[]));
    }
    let mut ok = frames.clone();
    ok.push(frame(CONTINUATION, END_HEADERS, 1, &[]));
    // At the limit: still a request (the last of the allowed frames ends it)...
    let mut at_limit = frames[..frames.len() - 1].to_vec();
    at_limit.push(frame(CONTINUATION, END_HEADERS, 1, &[0x84]));
    let blocks = decode_blocks(&normalized(&client(&at_limit)));
    assert_eq!(blocks[0].2, fields(&[(":method", "GET"), (":path", "/")]));
    // ...one more is refused.
    let input = client(&ok);
    let err = run(&input, 4096).unwrap_err();
    assert!(
        matches!(err, Error::TooManyContinuations { stream: 1, limit } if limit == MAX_CONTINUATIONS),
        "{err:?}"
    );
}

#[test]
fn header_blocks_are_bounded_as_decoded() {
    // A 4000-byte value indexed once, then referenced by one octet 20 times: 80 KB decoded from 20 bytes.
    let mut first = vec![0x40, 0x01, b'x', 0x7f, 0xa1, 0x1e]; // literal, indexed; name "x"; value len 4000
    first.extend_from_slice(&[b'v'; 4000]);
    let bomb = vec![0xbe; 20];
    let input = client(&[
        frame(HEADERS, END_HEADERS, 1, &first),
        frame(HEADERS, END_HEADERS, 3, &bomb),
    ]);
    let err = run(&input, input.len()).unwrap_err();
    assert!(
        matches!(err, Error::HeaderBlockTooLarge { stream: 3, .. }),
        "{err:?}"
    );
}

fn authority() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        "/[a-zA-Z0-9_/.-]{1,40}",
        "[a-zA-Z0-9_%./-]{1,40}",
        "[ -~]{0,30}",
    ]
}

fn metadata() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(("x-[a-z0-9-]{1,12}", "[ -~]{0,60}"), 0..6)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Several requests on one connection, encoded by a reference encoder that indexes into its dynamic
    /// table, split into frames and fed in pieces of random size: the output carries the same fields with
    /// only invalid authorities replaced, and decodes with no dynamic table at all.
    #[test]
    fn reference_encoded_requests_survive(
        requests in prop::collection::vec((authority(), metadata(), any::<bool>()), 1..5),
        split in 8usize..128,
        feed in 1usize..300,
    ) {
        let mut enc = loona_hpack::Encoder::new();
        let mut frames = Vec::new();
        let mut lists = Vec::new();
        for (i, (auth, meta, end_stream)) in requests.iter().enumerate() {
            let stream = 1 + 2 * i as u32;
            let mut list = grpc_request(auth, "/pkg.Svc/Method");
            list.extend(meta.iter().map(|(n, v)| (n.clone().into_bytes(), v.clone().into_bytes())));
            let block = encode(&mut enc, &list);
            let mut pieces = block.chunks(split).peekable();
            let first = pieces.next().unwrap_or(&[]);
            let mut flags = if *end_stream { END_STREAM } else { 0 };
            if pieces.peek().is_none() {
                flags |= END_HEADERS;
            }
            frames.push(frame(HEADERS, flags, stream, first));
            while let Some(p) = pieces.next() {
                let flags = if pieces.peek().is_none() { END_HEADERS } else { 0 };
                frames.push(frame(CONTINUATION, flags, stream, p));
            }
            frames.push(frame(DATA, END_STREAM, stream, b"\0\0\0\0\0"));
            lists.push((stream, *end_stream, list));
        }
        let input = client(&frames);
        let out = run(&input, feed).unwrap();
        let frames = parse_frames(&out[PREFACE.len()..]);
        let blocks = decode_blocks(&frames);
        prop_assert_eq!(blocks.len(), lists.len());
        for ((stream, flags, got), (want_stream, end_stream, list)) in blocks.iter().zip(&lists) {
            prop_assert_eq!(stream, want_stream);
            prop_assert_eq!(flags & END_STREAM != 0, *end_stream);
            prop_assert_eq!(got, &expected(list));
        }
    }

    /// Arbitrary bytes as a header block (after a block that filled the client's table) never panic the
    /// decoder: they are rewritten or refused.
    #[test]
    fn arbitrary_header_blocks_never_panic(block in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut first = vec![0x41, 11];
        first.extend_from_slice(b"/run/x.sock");
        let input = client(&[
            frame(HEADERS, END_HEADERS, 1, &first),
            frame(HEADERS, END_HEADERS, 3, &block),
        ]);
        if let Ok(out) = run(&input, input.len()) {
            prop_assert_eq!(decode_blocks(&parse_frames(&out[PREFACE.len()..])).len(), 2);
        }
    }

    /// Arbitrary bytes after the preface never panic, and whatever is accepted is passed on.
    #[test]
    fn arbitrary_input_never_panics(body in prop::collection::vec(any::<u8>(), 0..2000), feed in 1usize..64) {
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&body);
        let _ = run(&input, feed);
    }
}
