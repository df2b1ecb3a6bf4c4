//! The API's unix-socket transport: makes every stock gRPC client work with default options.
//!
//! Since grpc-core 1.57 (Python, C++, Ruby, PHP), and in grpc-java and grpc-swift, a client on a
//! unix socket sends the socket's path, percent-encoded, as the HTTP/2 `:authority`
//! (`%2Fvar%2Flib%2Fmetald%2Fmetald.sock`). That is not a valid URI authority, and the HTTP/2
//! layer under tonic resets every such stream with PROTOCOL_ERROR before metald sees a request.
//! An authority means nothing on a unix socket, so [`AuthorityFix`] rewrites, on the client's
//! side of each connection, any `:authority` that is not a valid one to `localhost` (what grpc-go
//! and metalctl send) before the HTTP/2 layer parses it.
//!
//! Rewriting a header means re-encoding its block. The client compresses headers against a
//! dynamic table it shares with the server (HPACK), so every block is decoded here against the
//! client's table and re-encoded as literals that never touch the server's table: the server's
//! table stays empty and can never disagree with the client's. Every other frame passes through
//! unchanged, and nothing is rewritten in the server's direction.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Every HTTP/2 peer accepts frames this large (the protocol's minimum maximum).
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is refused rather than buffered (metald's requests carry a
/// few hundred bytes of headers).
const MAX_BLOCK: usize = 1 << 20;
/// What an invalid authority becomes.
const LOCALHOST: &[u8] = b"localhost";

/// A header block being collected from a HEADERS frame and its CONTINUATIONs.
struct Block {
    stream_id: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server half of the rewrite, free of I/O so that it can be fed any split of the
/// byte stream.
pub struct Rewriter {
    preface_left: usize,
    /// Payload bytes of a frame that passes through unchanged, still to copy.
    passthrough: usize,
    block: Option<Block>,
    decoder: fluke_hpack::Decoder<'static>,
}

impl Default for Rewriter {
    fn default() -> Self {
        Rewriter {
            preface_left: PREFACE.len(),
            passthrough: 0,
            block: None,
            decoder: fluke_hpack::Decoder::new(),
        }
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Rewriter {
    /// Moves what can be moved from `raw` (bytes from the client) to `out` (bytes for the
    /// HTTP/2 server), leaving an incomplete frame header or header block in `raw`.
    pub fn feed(&mut self, raw: &mut BytesMut, out: &mut BytesMut) -> io::Result<()> {
        loop {
            if self.preface_left > 0 {
                let n = self.preface_left.min(raw.len());
                out.extend_from_slice(&raw.split_to(n));
                self.preface_left -= n;
                if self.preface_left > 0 {
                    return Ok(());
                }
            }
            if self.passthrough > 0 {
                let n = self.passthrough.min(raw.len());
                out.extend_from_slice(&raw.split_to(n));
                self.passthrough -= n;
                if self.passthrough > 0 {
                    return Ok(());
                }
            }
            // A frame header is 9 bytes (FRAME_HEADER): length, type, flags, stream id.
            let &[l0, l1, l2, kind, flags, s0, s1, s2, s3, ..] = raw.as_ref() else {
                return Ok(());
            };
            let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            let stream_id = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
            if kind != HEADERS && kind != CONTINUATION {
                if self.block.is_some() {
                    return Err(invalid("a header block was interrupted by another frame"));
                }
                out.extend_from_slice(&raw.split_to(FRAME_HEADER));
                self.passthrough = len;
                continue;
            }
            if len > MAX_BLOCK {
                return Err(invalid(format!("a {len}-byte header frame is too large")));
            }
            if raw.len() < FRAME_HEADER + len {
                return Ok(());
            }
            raw.advance(FRAME_HEADER);
            let payload = raw.split_to(len);
            match (kind, self.block.as_mut()) {
                (HEADERS, None) => self.block = Some(headers_frame(stream_id, flags, &payload)?),
                (CONTINUATION, Some(b)) if b.stream_id == stream_id => {
                    if b.fragment.len() + payload.len() > MAX_BLOCK {
                        return Err(invalid("a header block is too large"));
                    }
                    b.fragment.extend_from_slice(&payload);
                }
                _ => return Err(invalid("a CONTINUATION frame out of sequence")),
            }
            if flags & END_HEADERS != 0
                && let Some(block) = self.block.take()
            {
                self.reencode(block, out)?;
            }
        }
    }

    /// Decodes a whole header block against the client's table, rewrites an invalid
    /// `:authority`, and writes it out as literals without indexing, split into frames.
    fn reencode(&mut self, block: Block, out: &mut BytesMut) -> io::Result<()> {
        let headers = self
            .decoder
            .decode(&block.fragment)
            .map_err(|e| invalid(format!("undecodable header block: {e:?}")))?;
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        for (name, value) in &headers {
            let value: &[u8] =
                if name == b":authority" && http::uri::Authority::try_from(&value[..]).is_err() {
                    LOCALHOST
                } else {
                    value
                };
            // Literal header field without indexing, new name (RFC 7541 §6.2.2).
            encoded.push(0);
            for s in [&name[..], value] {
                fluke_hpack::encoder::encode_integer_into(s.len(), 7, 0, &mut encoded)?;
                encoded.extend_from_slice(s);
            }
        }
        let prio = block.priority.map(|p| p.to_vec()).unwrap_or_default();
        let mut rest = &encoded[..];
        let mut first = true;
        loop {
            let room = MAX_FRAME - if first { prio.len() } else { 0 };
            let n = room.min(rest.len());
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            let last = rest.is_empty();
            let mut flags = if last { END_HEADERS } else { 0 };
            let kind = if first {
                if block.end_stream {
                    flags |= END_STREAM;
                }
                if block.priority.is_some() {
                    flags |= PRIORITY;
                }
                HEADERS
            } else {
                CONTINUATION
            };
            let len = chunk.len() + if first { prio.len() } else { 0 };
            let len = u32::try_from(len).map_err(|_| invalid("frame too large"))?;
            out.put_slice(&len.to_be_bytes()[1..]);
            out.put_u8(kind);
            out.put_u8(flags);
            out.put_u32(block.stream_id);
            if first {
                out.put_slice(&prio);
            }
            out.put_slice(chunk);
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// Splits a HEADERS frame's payload into its priority fields and its block fragment, dropping
/// its padding.
fn headers_frame(stream_id: u32, flags: u8, payload: &[u8]) -> io::Result<Block> {
    let mut at = 0;
    let mut pad = 0;
    if flags & PADDED != 0 {
        pad = usize::from(
            *payload
                .first()
                .ok_or_else(|| invalid("empty padded frame"))?,
        );
        at = 1;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let p = payload
            .get(at..at + 5)
            .ok_or_else(|| invalid("short priority fields"))?;
        let mut buf = [0; 5];
        buf.copy_from_slice(p);
        priority = Some(buf);
        at += 5;
    }
    let end = payload
        .len()
        .checked_sub(pad)
        .filter(|&e| e >= at)
        .ok_or_else(|| invalid("padding longer than the frame"))?;
    Ok(Block {
        stream_id,
        end_stream: flags & END_STREAM != 0,
        priority,
        fragment: payload
            .get(at..end)
            .ok_or_else(|| invalid("padding longer than the frame"))?
            .to_vec(),
    })
}

/// A unix-socket connection whose client-side bytes go through a [`Rewriter`].
pub struct AuthorityFix {
    inner: UnixStream,
    rewriter: Rewriter,
    raw: BytesMut,
    out: BytesMut,
    eof: bool,
}

impl AuthorityFix {
    /// Wraps an accepted connection.
    pub fn new(inner: UnixStream) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::default(),
            raw: BytesMut::new(),
            out: BytesMut::new(),
            eof: false,
        }
    }
}

impl AsyncRead for AuthorityFix {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = buf.remaining().min(this.out.len());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            this.rewriter.feed(&mut this.raw, &mut this.out)?;
            if !this.out.is_empty() {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // A connection that ends mid-frame ends here too; the server sees the EOF.
                Poll::Ready(Ok(())) if rb.filled().is_empty() => this.eof = true,
                Poll::Ready(Ok(())) => this.raw.extend_from_slice(rb.filled()),
            }
        }
    }
}

impl AsyncWrite for AuthorityFix {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl Connected for AuthorityFix {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Runs `input` through a rewriter in pieces of `step` bytes; returns the output.
    fn run(input: &[u8], step: usize) -> Vec<u8> {
        let mut rw = Rewriter::default();
        let mut raw = BytesMut::new();
        let mut out = BytesMut::new();
        for piece in input.chunks(step) {
            raw.extend_from_slice(piece);
            rw.feed(&mut raw, &mut out).unwrap();
        }
        assert!(raw.is_empty(), "{} bytes left", raw.len());
        out.to_vec()
    }

    /// Splits a byte stream (after the preface) into frames.
    fn frames(mut b: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        b = &b[PREFACE.len()..];
        let mut v = Vec::new();
        while !b.is_empty() {
            let len = (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize;
            let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
            v.push((b[3], b[4], id, b[9..9 + len].to_vec()));
            b = &b[9 + len..];
        }
        v
    }

    #[test]
    fn an_invalid_authority_becomes_localhost_and_everything_else_passes() {
        // A client that indexes its headers (as grpc-core does): the second request refers to
        // the first one's dynamic-table entries.
        let mut enc = fluke_hpack::Encoder::new();
        let req: Vec<(&[u8], &[u8])> = vec![
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", b"/metald.v1.VmService/ListVms"),
            (b":authority", b"%2Fvar%2Flib%2Fmetald%2Fmetald.sock"),
            (b"te", b"trailers"),
        ];
        let b1 = enc.encode(req.clone());
        let b2 = enc.encode(req.clone());
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])); // SETTINGS
        // The first block split over HEADERS (padded, with priority) and a CONTINUATION.
        let mut p = vec![2u8]; // pad length
        p.extend_from_slice(&[0, 0, 0, 0, 15]); // priority
        p.extend_from_slice(&b1[..10]);
        p.extend_from_slice(&[0, 0]);
        input.extend(frame(HEADERS, PADDED | PRIORITY, 1, &p));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, &b1[10..]));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\x02hi")); // DATA
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &b2));
        for step in [1, 7, input.len()] {
            let out = run(&input, step);
            let fs = frames(&out);
            assert_eq!(fs.len(), 4, "step {step}: {fs:?}");
            assert_eq!(fs[0].0, 0x4);
            assert_eq!(fs[2], (0x0, END_STREAM, 1, b"\0\0\0\0\x02hi".to_vec()));
            // A fresh decoder decodes each rewritten block by itself: nothing is indexed.
            for (f, end_stream) in [(&fs[1], false), (&fs[3], true)] {
                assert_eq!(f.0, HEADERS);
                let mut flags = END_HEADERS;
                let mut block = &f.3[..];
                if f.2 == 1 {
                    flags |= PRIORITY;
                    assert_eq!(&block[..5], &[0, 0, 0, 0, 15]);
                    block = &block[5..];
                }
                if end_stream {
                    flags |= END_STREAM;
                }
                assert_eq!(f.1, flags);
                let got = fluke_hpack::Decoder::new().decode(block).unwrap();
                let want: Vec<(Vec<u8>, Vec<u8>)> = req
                    .iter()
                    .map(|(n, v)| {
                        let v: &[u8] = if *n == b":authority" { LOCALHOST } else { v };
                        (n.to_vec(), v.to_vec())
                    })
                    .collect();
                assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn a_valid_authority_is_kept_and_a_large_block_is_split() {
        let mut enc = fluke_hpack::Encoder::new();
        let big = vec![b'x'; 40_000];
        let block = enc.encode(vec![
            (&b":authority"[..], &b"localhost:50051"[..]),
            (b"x-big", &big),
        ]);
        let mut input = PREFACE.to_vec();
        let (a, b) = block.split_at(block.len() / 2);
        input.extend(frame(HEADERS, 0, 5, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, b));
        let out = run(&input, 1000);
        let fs = frames(&out);
        assert!(fs.len() >= 3);
        assert!(fs.iter().all(|f| f.3.len() <= MAX_FRAME));
        let block: Vec<u8> = fs.iter().flat_map(|f| f.3.clone()).collect();
        assert_eq!(fs.last().unwrap().1, END_HEADERS);
        let got = fluke_hpack::Decoder::new().decode(&block).unwrap();
        assert_eq!(got[0].1, b"localhost:50051");
        assert_eq!(got[1].1, big);
    }

    #[test]
    fn a_raw_socket_path_authority_becomes_localhost_too() {
        // Older grpc-go and grpcurl send the path itself.
        let mut enc = fluke_hpack::Encoder::new();
        let block = enc.encode(vec![(
            &b":authority"[..],
            &b"/var/lib/metald/metald.sock"[..],
        )]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let fs = frames(&run(&input, 3));
        let got = fluke_hpack::Decoder::new().decode(&fs[0].3).unwrap();
        assert_eq!(got[0].1, LOCALHOST);
    }

    #[test]
    fn a_block_interrupted_by_another_frame_is_refused() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x0, 0, 1, b""));
        let mut rw = Rewriter::default();
        let mut raw = BytesMut::from(&input[..]);
        let mut out = BytesMut::new();
        assert!(rw.feed(&mut raw, &mut out).is_err());
    }
}
