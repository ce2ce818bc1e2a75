//! The client-to-server half of an HTTP/2 connection, rewritten so that the server's HTTP/2
//! layer (h2) never sees an `:authority` it would reject.
//!
//! Why: on a unix socket the authority means nothing, and conforming clients send all sorts.
//! kubelet's plugin watcher and other grpc-go programs that dial by path send the socket path
//! (`/var/lib/kubelet/plugins_registry/…sock`), gRPC C-core (Python, C++, Ruby) sends its own
//! form, some send it empty. h2 parses `:authority` as a URI authority and resets the stream with
//! PROTOCOL_ERROR when that fails, so those clients cannot talk to a tonic server at all.
//!
//! How: HPACK is stateful (a per-connection dynamic table), so a single header value cannot be
//! patched in place. Every header block the client sends is decoded with a mirror of the
//! client's compression context and re-encoded as literals that never touch the server's dynamic
//! table; `:authority` values that are not a valid URI authority become `localhost`. Every other
//! header name, value and order passes unchanged, so h2 validates them exactly as before, and all
//! frames other than HEADERS/CONTINUATION pass byte for byte.
//!
//! Anything this module does not understand — no HTTP/2 preface, a malformed or oversized header
//! block, frames out of order — is handed to h2 verbatim and the rest of the connection passes
//! through untouched, so h2 makes its own decision (GOAWAY, RST_STREAM) exactly as it would have.
//! That hand-over is always safe: the blocks this module emits never add to the server's dynamic
//! table, so the server's table is always a prefix (newest first) of the client's and any
//! reference the server resolves means what the client meant.

use std::borrow::Cow;

/// What HTTP/2 clients send first (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a malformed `:authority` becomes.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
const PRIORITY_LEN: usize = 5;

/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may have (RFC 9113 §6.5.2): emitted frames never
/// exceed it, and a header frame above it is left to h2 (which allows no more unless configured).
const MAX_FRAME_PAYLOAD: usize = 16_384;

/// SETTINGS_HEADER_TABLE_SIZE the server advertises (h2's default; plinth never changes it): a
/// client may not grow its table beyond this.
const SERVER_HEADER_TABLE_SIZE: usize = 4_096;

/// Header blocks above these sizes (compressed, and decoded as RFC 7541 counts them) are left to
/// h2, whose own limit (hyper's default SETTINGS_MAX_HEADER_LIST_SIZE, 16 KiB) is far lower; they
/// bound what this module buffers per connection.
const MAX_BLOCK_BYTES: usize = 64 * 1024;
const MAX_DECODED_BYTES: usize = 64 * 1024;

/// True when h2 would accept `value` as `:authority`.
pub fn is_valid_authority(value: &[u8]) -> bool {
    !value.is_empty() && http::uri::Authority::try_from(value).is_ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Preface,
    Frames,
    /// The payload of a frame that is not part of a header block: copied as it arrives.
    Copying {
        remaining: usize,
    },
    /// Verbatim from here on: h2 decides.
    Passthrough,
}

/// A header block being collected from a HEADERS frame and its CONTINUATION frames.
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_LEN]>,
    fragment: Vec<u8>,
    /// The frames exactly as received, for the hand-over to h2.
    raw: Vec<u8>,
}

/// Why a connection was handed over to h2 unmodified (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOver {
    NotHttp2,
    MalformedFrame,
    OversizedBlock,
    UndecodableBlock,
}

/// Sans-I/O rewriter of the client-to-server byte stream of one connection.
pub struct Rewriter {
    phase: Phase,
    decoder: loona_hpack::Decoder<'static>,
    pending: Vec<u8>,
    block: Option<Block>,
    handed_over: Option<HandOver>,
    rewritten: usize,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(SERVER_HEADER_TABLE_SIZE);
        Self { phase: Phase::Preface, decoder, pending: Vec::new(), block: None, handed_over: None, rewritten: 0 }
    }

    /// Whether everything from now on passes verbatim (the caller may then skip the rewriter).
    pub fn is_passthrough(&self) -> bool {
        self.phase == Phase::Passthrough && self.pending.is_empty()
    }

    /// Why the connection was handed over to h2, if it was.
    pub fn handed_over(&self) -> Option<HandOver> {
        self.handed_over
    }

    /// How many `:authority` values were replaced so far.
    pub fn rewritten(&self) -> usize {
        self.rewritten
    }

    /// Feeds bytes read from the client; appends what the server should read to `out`.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        if let Phase::Passthrough = self.phase {
            out.extend_from_slice(input);
            return;
        }
        let mut buffer = std::mem::take(&mut self.pending);
        buffer.extend_from_slice(input);
        let mut consumed = 0;
        while let Some(used) = self.step(&buffer[consumed..], out) {
            consumed += used;
            if self.phase == Phase::Passthrough {
                out.extend_from_slice(&buffer[consumed..]);
                consumed = buffer.len();
                break;
            }
        }
        buffer.drain(..consumed);
        self.pending = buffer;
    }

    /// The client closed its side: whatever is still held goes to h2 as it came.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        out.append(&mut self.pending);
        self.phase = Phase::Passthrough;
    }

    fn hand_over(&mut self, why: HandOver, out: &mut Vec<u8>) {
        tracing::debug!(?why, "HTTP/2 connection handed to the server unmodified");
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        self.handed_over = Some(why);
        self.phase = Phase::Passthrough;
    }

    /// Processes the start of `input`; returns how many bytes it consumed, or `None` when it
    /// needs more.
    fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        match self.phase {
            Phase::Passthrough => None,
            Phase::Preface => {
                let seen = input.len().min(PREFACE.len());
                if input[..seen] != PREFACE[..seen] {
                    self.hand_over(HandOver::NotHttp2, out);
                    return Some(0);
                }
                if seen < PREFACE.len() {
                    return None;
                }
                out.extend_from_slice(PREFACE);
                self.phase = Phase::Frames;
                Some(PREFACE.len())
            }
            Phase::Copying { remaining } => {
                if input.is_empty() {
                    return None;
                }
                let n = remaining.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.phase = if n == remaining { Phase::Frames } else { Phase::Copying { remaining: remaining - n } };
                Some(n)
            }
            Phase::Frames => {
                if input.len() < FRAME_HEADER_LEN {
                    return None;
                }
                let length = usize::from(input[0]) << 16 | usize::from(input[1]) << 8 | usize::from(input[2]);
                let (kind, flags) = (input[3], input[4]);
                let stream_id = u32::from_be_bytes([input[5], input[6], input[7], input[8]]) & 0x7fff_ffff;
                let is_header_frame = kind == TYPE_HEADERS || kind == TYPE_CONTINUATION;
                if !is_header_frame && self.block.is_none() {
                    out.extend_from_slice(&input[..FRAME_HEADER_LEN]);
                    self.phase = if length == 0 { Phase::Frames } else { Phase::Copying { remaining: length } };
                    return Some(FRAME_HEADER_LEN);
                }
                if !is_header_frame {
                    // RFC 9113 §6.10: nothing may interleave with a header block.
                    self.hand_over(HandOver::MalformedFrame, out);
                    return Some(0);
                }
                if length > MAX_FRAME_PAYLOAD {
                    self.hand_over(HandOver::OversizedBlock, out);
                    return Some(0);
                }
                let total = FRAME_HEADER_LEN + length;
                if input.len() < total {
                    return None;
                }
                let frame = &input[..total];
                let accepted = if kind == TYPE_HEADERS {
                    self.start_block(frame, flags, stream_id)
                } else {
                    self.continue_block(frame, stream_id)
                };
                if let Err(why) = accepted {
                    self.hand_over(why, out);
                    return Some(0);
                }
                if flags & FLAG_END_HEADERS != 0 {
                    self.finish_block(out);
                }
                Some(total)
            }
        }
    }

    fn start_block(&mut self, frame: &[u8], flags: u8, stream_id: u32) -> Result<(), HandOver> {
        if self.block.is_some() || stream_id == 0 {
            return Err(HandOver::MalformedFrame);
        }
        let payload = &frame[FRAME_HEADER_LEN..];
        let (mut start, mut end) = (0, payload.len());
        if flags & FLAG_PADDED != 0 {
            let pad = usize::from(*payload.first().ok_or(HandOver::MalformedFrame)?);
            start = 1;
            end = end.checked_sub(pad).ok_or(HandOver::MalformedFrame)?;
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            let fields = payload.get(start..start + PRIORITY_LEN).ok_or(HandOver::MalformedFrame)?;
            priority = Some(<[u8; PRIORITY_LEN]>::try_from(fields).expect("five bytes"));
            start += PRIORITY_LEN;
        }
        let fragment = payload.get(start..end).ok_or(HandOver::MalformedFrame)?;
        self.block = Some(Block {
            stream_id,
            end_stream: flags & FLAG_END_STREAM != 0,
            priority,
            fragment: fragment.to_vec(),
            raw: frame.to_vec(),
        });
        Ok(())
    }

    fn continue_block(&mut self, frame: &[u8], stream_id: u32) -> Result<(), HandOver> {
        let block = self.block.as_mut().ok_or(HandOver::MalformedFrame)?;
        if block.stream_id != stream_id {
            return Err(HandOver::MalformedFrame);
        }
        if block.raw.len() + frame.len() > MAX_BLOCK_BYTES {
            return Err(HandOver::OversizedBlock);
        }
        block.raw.extend_from_slice(frame);
        block.fragment.extend_from_slice(&frame[FRAME_HEADER_LEN..]);
        Ok(())
    }

    fn finish_block(&mut self, out: &mut Vec<u8>) {
        let Some(block) = self.block.take() else { return };
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut decoded = 0usize;
        let mut oversized = false;
        let result = self.decoder.decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
            decoded += name.len() + value.len() + 32;
            oversized |= decoded > MAX_DECODED_BYTES;
            if !oversized {
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        if result.is_err() || oversized {
            // The decoder may have half-applied the block; it is never used again.
            self.block = Some(block);
            let why = if oversized { HandOver::OversizedBlock } else { HandOver::UndecodableBlock };
            self.hand_over(why, out);
            return;
        }
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority" && !is_valid_authority(value) {
                if self.rewritten == 0 {
                    tracing::debug!(authority = %String::from_utf8_lossy(value), "normalising :authority to localhost");
                }
                *value = REPLACEMENT_AUTHORITY.to_vec();
                self.rewritten += 1;
            }
        }
        write_header_block(&block, &encode_literals(&fields), out);
    }
}

/// RFC 7541 §5.1 integer with an N-bit prefix; `first` carries the representation's flag bits.
fn encode_integer(mut value: usize, prefix_bits: u8, first: u8, out: &mut Vec<u8>) {
    let max_prefix = (1usize << prefix_bits) - 1;
    if value < max_prefix {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max_prefix as u8);
    value -= max_prefix;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Every field as "literal never indexed, new name" (RFC 7541 §6.2.3): the server's dynamic
/// table is never touched, and a field the client marked sensitive stays marked for any hop.
fn encode_literals(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x10);
        encode_integer(name.len(), 7, 0, &mut out);
        out.extend_from_slice(name);
        encode_integer(value.len(), 7, 0, &mut out);
        out.extend_from_slice(value);
    }
    out
}

fn frame_header(length: usize, kind: u8, flags: u8, stream_id: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&[(length >> 16) as u8, (length >> 8) as u8, length as u8, kind, flags]);
    out.extend_from_slice(&stream_id.to_be_bytes());
}

/// The block as one HEADERS frame (no padding) and as many CONTINUATION frames as it needs.
fn write_header_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let priority_len = if block.priority.is_some() { PRIORITY_LEN } else { 0 };
    let first_len = encoded.len().min(MAX_FRAME_PAYLOAD - priority_len);
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
    frame_header(priority_len + first.len(), TYPE_HEADERS, flags, block.stream_id, out);
    if let Some(priority) = block.priority {
        out.extend_from_slice(&priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_PAYLOAD));
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(chunk.len(), TYPE_CONTINUATION, flags, block.stream_id, out);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame as a client would write it.
    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(payload.len(), kind, flags, stream_id, &mut out);
        out.extend_from_slice(payload);
        out
    }

    const SETTINGS_EMPTY: &[u8] = &[0, 0, 0, 0x4, 0, 0, 0, 0, 0];

    fn grpc_request(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/csi.v1.Identity/GetPluginInfo"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect()
    }

    /// Splits the server-bound output into frames: (type, flags, stream, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE), "output starts with the preface");
        bytes = &bytes[PREFACE.len()..];
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let length = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            frames.push((bytes[3], bytes[4], stream, bytes[9..9 + length].to_vec()));
            bytes = &bytes[9 + length..];
        }
        frames
    }

    /// Decodes the header blocks the server would see, with a fresh server-side decoder.
    fn server_view(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        let mut fragment = Vec::new();
        for (kind, flags, _, payload) in frames(bytes) {
            match kind {
                TYPE_HEADERS => {
                    let skip = if flags & FLAG_PRIORITY != 0 { PRIORITY_LEN } else { 0 };
                    assert_eq!(flags & FLAG_PADDED, 0, "emitted frames carry no padding");
                    fragment = payload[skip..].to_vec();
                }
                TYPE_CONTINUATION => fragment.extend_from_slice(&payload),
                _ => continue,
            }
            if flags & FLAG_END_HEADERS != 0 {
                blocks.push(decoder.decode(&fragment).expect("server decodes the block"));
            }
        }
        blocks
    }

    fn authority_of(block: &[(Vec<u8>, Vec<u8>)]) -> Option<&[u8]> {
        block.iter().find(|(n, _)| n == b":authority").map(|(_, v)| v.as_slice())
    }

    fn connection(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(SETTINGS_EMPTY);
        for (i, block) in blocks.iter().enumerate() {
            bytes.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1 + 2 * i as u32, block));
        }
        bytes
    }

    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, Rewriter) {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            rewriter.push(piece, &mut out);
        }
        rewriter.finish(&mut out);
        (out, rewriter)
    }

    #[test]
    fn validity_matches_what_h2_accepts() {
        assert!(is_valid_authority(b"localhost"));
        assert!(is_valid_authority(b"localhost:1234"));
        assert!(is_valid_authority(b"plinth.invalid"));
        assert!(!is_valid_authority(b"/var/lib/kubelet/plugins_registry/plinth.csi.dev-reg.sock"));
        assert!(!is_valid_authority(b""));
        assert!(!is_valid_authority(b"unix:/tmp/x.sock"));
    }

    #[test]
    fn a_path_authority_becomes_localhost_and_everything_else_is_kept() {
        let path = b"/var/lib/kubelet/plugins_registry/plinth.csi.dev-reg.sock";
        let mut encoder = loona_hpack::Encoder::new();
        let fields = grpc_request(path);
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let (out, rewriter) = run(&connection(&[block]), 4096);
        let blocks = server_view(&out);
        assert_eq!(blocks.len(), 1);
        let mut expected = fields.clone();
        expected[3].1 = b"localhost".to_vec();
        assert_eq!(blocks[0], expected, "only :authority changed, order kept");
        assert_eq!(rewriter.rewritten(), 1);
        assert_eq!(rewriter.handed_over(), None);
    }

    #[test]
    fn valid_authorities_pass_unchanged_and_empty_is_replaced() {
        for (authority, expected) in [
            (&b"localhost"[..], &b"localhost"[..]),
            (b"plinth.invalid", b"plinth.invalid"),
            (b"%2Fvar%2Flib%2Fkubelet%2Fplugins%2Fplinth.csi.dev%2Fcsi.sock", b"localhost"),
            (b"", b"localhost"),
        ] {
            let mut encoder = loona_hpack::Encoder::new();
            let fields = grpc_request(authority);
            let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
            let (out, _) = run(&connection(&[block]), 7);
            let blocks = server_view(&out);
            let seen = authority_of(&blocks[0]).unwrap();
            let valid = is_valid_authority(authority);
            assert_eq!(seen, if valid { authority } else { expected }, "{:?}", String::from_utf8_lossy(authority));
        }
    }

    #[test]
    fn an_absent_authority_stays_absent() {
        let mut fields = grpc_request(b"x");
        fields.remove(3);
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let (out, _) = run(&connection(&[block]), 1);
        assert_eq!(server_view(&out)[0], fields);
    }

    /// Every field as "literal with incremental indexing, new name": each lands in the table.
    fn indexing_block(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x40);
            encode_integer(name.len(), 7, 0, &mut out);
            out.extend_from_slice(name);
            encode_integer(value.len(), 7, 0, &mut out);
            out.extend_from_slice(value);
        }
        out
    }

    /// The same fields again, each a one-byte reference into the dynamic table (newest is 62).
    fn reference_block(count: usize) -> Vec<u8> {
        (0..count).map(|i| 0x80 | (62 + count - 1 - i) as u8).collect()
    }

    #[test]
    fn the_clients_dynamic_table_is_followed_across_requests() {
        let fields = grpc_request(b"/run/plinth/csi.sock");
        let blocks = vec![indexing_block(&fields), reference_block(fields.len()), reference_block(fields.len())];
        let (out, rewriter) = run(&connection(&blocks), 3);
        let seen = server_view(&out);
        assert_eq!(seen.len(), 3);
        let mut expected = fields.clone();
        expected[3].1 = b"localhost".to_vec();
        for block in &seen {
            assert_eq!(block, &expected);
        }
        assert_eq!(rewriter.rewritten(), 3);
        assert_eq!(rewriter.handed_over(), None);
    }

    #[test]
    fn huffman_coded_fields_are_decoded() {
        // RFC 7541 C.4.1: GET, http, /, :authority www.example.com (Huffman-coded).
        let block =
            [0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff];
        let (out, _) = run(&connection(&[block.to_vec()]), 5);
        let seen = server_view(&out);
        assert_eq!(authority_of(&seen[0]), Some(&b"www.example.com"[..]));
        assert_eq!(seen[0][2], (b":path".to_vec(), b"/".to_vec()));
    }

    #[test]
    fn padding_priority_continuation_and_end_stream_are_honoured() {
        let mut encoder = loona_hpack::Encoder::new();
        let fields = grpc_request(b"/a/b.sock");
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let (head, tail) = block.split_at(10);
        let mut payload = vec![3u8]; // pad length
        payload.extend_from_slice(&[0x80, 0, 0, 1, 16]); // exclusive dependency on stream 1, weight 16
        payload.extend_from_slice(head);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(TYPE_HEADERS, FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM, 3, &payload));
        bytes.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, tail));
        let (out, _) = run(&bytes, 2);
        let emitted = frames(&out);
        assert_eq!(emitted.len(), 1);
        let (kind, flags, stream, payload) = &emitted[0];
        assert_eq!((*kind, *stream), (TYPE_HEADERS, 3));
        assert_eq!(*flags, FLAG_END_STREAM | FLAG_PRIORITY | FLAG_END_HEADERS);
        assert_eq!(&payload[..5], &[0x80, 0, 0, 1, 16]);
        assert_eq!(authority_of(&server_view(&out)[0]), Some(&b"localhost"[..]));
    }

    #[test]
    fn other_frames_pass_byte_for_byte() {
        let mut bytes = connection(&[]);
        let data = frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 3, 1, 2, 3]);
        let ping = frame(0x6, 0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]);
        bytes.extend_from_slice(&data);
        bytes.extend_from_slice(&ping);
        for chunk in [1, 5, 4096] {
            assert_eq!(run(&bytes, chunk).0, bytes);
        }
    }

    #[test]
    fn large_blocks_are_split_into_continuations() {
        let mut fields = grpc_request(b"/x.sock");
        fields.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut bytes = PREFACE.to_vec();
        let (a, rest) = block.split_at(16_000);
        let (b, c) = rest.split_at(16_000);
        bytes.extend(frame(TYPE_HEADERS, 0, 1, a));
        bytes.extend(frame(TYPE_CONTINUATION, 0, 1, b));
        bytes.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c));
        let (out, rewriter) = run(&bytes, 1000);
        assert_eq!(rewriter.handed_over(), None);
        for (_, _, _, payload) in frames(&out) {
            assert!(payload.len() <= MAX_FRAME_PAYLOAD);
        }
        let seen = server_view(&out);
        assert_eq!(seen[0].last().unwrap().1.len(), 40_000);
        assert_eq!(authority_of(&seen[0]), Some(&b"localhost"[..]));
    }

    #[test]
    fn what_it_cannot_understand_goes_to_h2_verbatim() {
        let mut encoder = loona_hpack::Encoder::new();
        let fields = grpc_request(b"/a.sock");
        let good = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let cases: Vec<(&str, Vec<u8>, HandOver)> = vec![
            ("HTTP/1.1", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), HandOver::NotHttp2),
            (
                "index out of range",
                {
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x7f]));
                    b
                },
                HandOver::UndecodableBlock,
            ),
            (
                "table size above the server's",
                {
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0x3f, 0xe1, 0x3f, 0x82]));
                    b
                },
                HandOver::UndecodableBlock,
            ),
            (
                "stream 0",
                {
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 0, &good));
                    b
                },
                HandOver::MalformedFrame,
            ),
            (
                "padding longer than the frame",
                {
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, &[200, 1, 2]));
                    b
                },
                HandOver::MalformedFrame,
            ),
            (
                "DATA inside a header block",
                {
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, 0, 1, &good[..4]));
                    b.extend(frame(0x0, 0, 1, b"x"));
                    b
                },
                HandOver::MalformedFrame,
            ),
            (
                "CONTINUATION of another stream",
                {
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, 0, 1, &good[..4]));
                    b.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 3, &good[4..]));
                    b
                },
                HandOver::MalformedFrame,
            ),
            (
                "frame above the minimum max frame size",
                {
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &vec![0x82; MAX_FRAME_PAYLOAD + 1]));
                    b
                },
                HandOver::OversizedBlock,
            ),
            (
                "decoded list above the limit",
                {
                    // One literal indexed into the client's table, then thousands of references to it.
                    let mut block = vec![0x40, 1, b'x', 0x7f, 0xa1, 0x1e];
                    block.extend(std::iter::repeat_n(b'v', 4000));
                    block.extend(std::iter::repeat_n(0xbe, 1000));
                    let mut b = connection(&[]);
                    b.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block));
                    b
                },
                HandOver::OversizedBlock,
            ),
        ];
        for (name, bytes, why) in cases {
            for chunk in [1, 3, 100_000] {
                let (out, rewriter) = run(&bytes, chunk);
                assert_eq!(out, bytes, "{name}: forwarded verbatim");
                assert_eq!(rewriter.handed_over(), Some(why), "{name}");
            }
        }
    }

    #[test]
    fn after_a_hand_over_everything_passes_verbatim() {
        let mut bytes = connection(&[]);
        bytes.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &[0xff, 0x7f]));
        let mut encoder = loona_hpack::Encoder::new();
        let fields = grpc_request(b"/a.sock");
        let later = frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            3,
            &encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))),
        );
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        rewriter.push(&bytes, &mut out);
        assert!(rewriter.is_passthrough());
        rewriter.push(&later, &mut out);
        bytes.extend_from_slice(&later);
        assert_eq!(out, bytes);
    }

    #[test]
    fn a_truncated_connection_forwards_what_it_holds() {
        let mut encoder = loona_hpack::Encoder::new();
        let fields = grpc_request(b"/a.sock");
        let block = encoder.encode(fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut bytes = connection(&[]);
        bytes.extend(frame(TYPE_HEADERS, 0, 1, &block));
        bytes.extend_from_slice(&[0, 0]); // half a frame header
        let (out, _) = run(&bytes, 9);
        assert_eq!(out, bytes);
    }
}
