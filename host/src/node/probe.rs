//! A minimal blocking HTTP/1.1 client for `paxwasm dev` and the end-to-end tests: one
//! request per connection (`Connection: close`), body sized by `Content-Length` or read
//! to EOF. It is for talking to our own replicas on loopback, not a general client.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Largest response read; bigger ones are an error.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request to `addr` (`host:port`) and reads the whole response.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> io::Result<Response> {
    let socket: SocketAddr = addr.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing")
    })?;
    let mut stream = TcpStream::connect_timeout(&socket, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream
        .take(RESPONSE_BYTES_MAX as u64 + 1)
        .read_to_end(&mut raw)?;
    if raw.len() > RESPONSE_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "response too large",
        ));
    }
    parse(&raw)
}

fn bad(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// The first whole response in `bytes` and the bytes it takes, or `None` until all of
/// it is there: for reading pipelined answers off one connection. The response must
/// carry `Content-Length`, as the API's answers do.
pub fn parse_next(bytes: &[u8]) -> io::Result<Option<(Response, usize)>> {
    let Some(split) = head_end(bytes) else {
        return Ok(None);
    };
    let (status, headers) = parse_head(&bytes[..split])?;
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .ok_or_else(|| bad("no content-length"))?
        .1
        .parse()
        .map_err(|_| bad("bad content-length"))?;
    let end = split + 4 + length;
    if bytes.len() < end {
        return Ok(None);
    }
    let body = bytes[split + 4..end].to_vec();
    Ok(Some((
        Response {
            status,
            headers,
            body,
        },
        end,
    )))
}

/// Where the head ends (the offset of its empty line's `\r\n\r\n`).
fn head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Status and headers (names lower-cased) of a head without its final `\r\n\r\n`.
fn parse_head(head: &[u8]) -> io::Result<(u16, Vec<(String, String)>)> {
    let head = std::str::from_utf8(head).map_err(|_| bad("headers not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok((status, headers))
}

fn parse(raw: &[u8]) -> io::Result<Response> {
    let split = head_end(raw).ok_or_else(|| bad("no end of headers"))?;
    let (status, headers) = parse_head(&raw[..split])?;
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    } else if let Some((_, len)) = headers.iter().find(|(n, _)| n == "content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if body.len() < len {
            return Err(bad("body shorter than content-length"));
        }
        body.truncate(len);
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut input: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = input
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("bad chunk"))?;
        let size_text = std::str::from_utf8(&input[..line_end]).map_err(|_| bad("bad chunk"))?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        input = &input[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if input.len() < size + 2 {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&input[..size]);
        input = &input[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sized_and_chunked_bodies() {
        let sized =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nPaxwasm-Index: 7\r\n\r\nOKextra")
                .unwrap();
        assert_eq!(sized.status, 200);
        assert_eq!(sized.body, b"OK");
        assert_eq!(sized.header("paxwasm-index"), Some("7"));
        let chunked =
            parse(b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!(chunked.status, 404);
        assert_eq!(chunked.body, b"abcde");
        assert!(parse(b"garbage").is_err());
    }

    #[test]
    fn parse_next_takes_one_whole_response_at_a_time() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nOKHTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
        let (first, used) = parse_next(two).unwrap().unwrap();
        assert_eq!((first.status, first.body.as_slice()), (200, &b"OK"[..]));
        let (second, rest) = parse_next(&two[used..]).unwrap().unwrap();
        assert_eq!((second.status, used + rest), (503, two.len()));
        for cut in [10, used - 1] {
            assert_eq!(parse_next(&two[..cut]).unwrap(), None, "{cut} bytes");
        }
        assert!(parse_next(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }
}
