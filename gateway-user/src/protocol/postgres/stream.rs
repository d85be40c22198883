//! A connection leg: plain TCP or TLS (terminated for clients, originated to servers).

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

pub enum Stream {
    Plain(TcpStream),
    FromClient(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    ToServer(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    pub fn is_tls(&self) -> bool {
        !matches!(self, Self::Plain(_))
    }

    /// The TCP socket underneath (for resets).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::FromClient(t) => t.get_ref().0,
            Self::ToServer(t) => t.get_ref().0,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::FromClient(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::ToServer(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::FromClient(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::ToServer(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::FromClient(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::ToServer(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::FromClient(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::ToServer(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
