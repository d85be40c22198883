//! Opaque TCP: connect to the original destination and relay bytes both ways.

use super::{BoxFuture, End, Engine, Outcome, Session};
use crate::proxy::relay;

pub struct TcpEngine;

impl Engine for TcpEngine {
    fn serve(&self, s: Session) -> BoxFuture<Outcome> {
        Box::pin(async move {
            let Session {
                mut client,
                upstream,
                traffic,
                shutdown,
                ..
            } = s;
            let mut server = match upstream.connect().await {
                Ok(server) => server,
                Err(e) => {
                    relay::reset(&client);
                    return Outcome::new(End::UpstreamUnreachable, Some(e.to_string()));
                }
            };
            relay::relay(&mut client, &mut server, &traffic, &shutdown).await
        })
    }
}
