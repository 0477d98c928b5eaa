//! The SMTP adapter for e-mail (OUT-1): one plain SMTP session per message
//! (EHLO, MAIL FROM, RCPT TO, DATA, QUIT) to a relay, such as the cluster's
//! mail relay or a provider's submission endpoint reachable without TLS.
//!
//! SMTP has no idempotency key. The message id goes into the `Message-ID`
//! header so receiving systems can drop a repeat; a crash between the
//! relay's "250" and our bookkeeping can therefore re-send an e-mail once.
//! Replies 4xx and timeouts are retried; 5xx are permanent.

use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::delivery::{Adapter, Outbound, SendError, Sending};

/// An SMTP relay.
#[derive(Debug, Clone)]
pub struct Smtp {
    /// `host:port`.
    pub relay: String,
    /// Envelope and header sender.
    pub from: String,
    /// Timeout of the whole session.
    pub timeout: Duration,
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
}

/// An address is safe to put on an SMTP command line.
fn plain_address(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 254
        && a.contains('@')
        && a.bytes().all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>')
}

/// The message in RFC 5322 form, UTF-8 subject and base64 body.
pub fn compose(from: &str, m: &Outbound) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(m.body.as_bytes());
    let lines: Vec<&str> = body.as_bytes().chunks(76).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: =?UTF-8?B?{subject}?=\r\nMessage-ID: <{id}@crm-outreach>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}\r\n",
        to = m.to,
        subject = b64(&m.subject),
        id = m.idempotency_key,
        body = lines.join("\r\n"),
    )
}

async fn reply(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<(u16, String), SendError> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = reader.read_line(&mut line).await.map_err(|e| SendError::Transient(format!("smtp read: {e}")))?;
        if n == 0 {
            return Err(SendError::Transient("smtp relay closed the connection".into()));
        }
        text.push_str(line.trim_end());
        // "250-..." continues, "250 ..." ends.
        if line.len() < 4 || line.as_bytes()[3] != b'-' {
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            return Ok((code, text));
        }
        text.push(' ');
    }
}

async fn expect(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    want: u16,
    step: &str,
) -> Result<(), SendError> {
    let (code, text) = reply(reader).await?;
    match code {
        c if c == want => Ok(()),
        400..=499 => Err(SendError::Transient(format!("smtp {step}: {text}"))),
        _ => Err(SendError::Permanent(format!("smtp {step}: {text}"))),
    }
}

impl Smtp {
    async fn session(&self, m: &Outbound) -> Result<(), SendError> {
        if !plain_address(&m.to) {
            return Err(SendError::Permanent("no usable e-mail address for the customer".into()));
        }
        let stream =
            TcpStream::connect(&self.relay).await.map_err(|e| SendError::Transient(format!("smtp connect: {e}")))?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let io = |e: std::io::Error| SendError::Transient(format!("smtp write: {e}"));
        expect(&mut reader, 220, "greeting").await?;
        write.write_all(b"EHLO crm-outreach\r\n").await.map_err(io)?;
        expect(&mut reader, 250, "EHLO").await?;
        write.write_all(format!("MAIL FROM:<{}>\r\n", self.from).as_bytes()).await.map_err(io)?;
        expect(&mut reader, 250, "MAIL FROM").await?;
        write.write_all(format!("RCPT TO:<{}>\r\n", m.to).as_bytes()).await.map_err(io)?;
        expect(&mut reader, 250, "RCPT TO").await?;
        write.write_all(b"DATA\r\n").await.map_err(io)?;
        expect(&mut reader, 354, "DATA").await?;
        // Base64 lines never start with '.', so no dot-stuffing is needed.
        write.write_all(compose(&self.from, m).as_bytes()).await.map_err(io)?;
        write.write_all(b".\r\n").await.map_err(io)?;
        expect(&mut reader, 250, "end of data").await?;
        let _ = write.write_all(b"QUIT\r\n").await;
        Ok(())
    }
}

impl Adapter for Smtp {
    fn send<'a>(&'a self, m: &'a Outbound) -> Sending<'a> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.session(m))
                .await
                .map_err(|_| SendError::Transient(format!("smtp session timed out after {:?}", self.timeout)))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_with_angle_brackets_or_spaces_are_refused() {
        assert!(plain_address("wang.li@example.com"));
        assert!(!plain_address("a@b.c>\r\nRCPT TO:<x@y.z"));
        assert!(!plain_address("no at sign"));
        assert!(!plain_address(""));
    }
}
