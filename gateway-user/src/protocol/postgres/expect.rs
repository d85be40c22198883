//! Which client message does each server response answer?
//!
//! The engine pushes an [`Expect`] for every message it forwards to the server (the client's,
//! substitutes for denied ones, and its own injected ones); the server's responses are fed
//! to [`Tracker::on_server`], which pairs them up following the protocol's rules:
//! - simple query: any number of result sets, errors and notices, then ReadyForQuery;
//! - extended query: one response per message, and after an ErrorResponse the server
//!   discards everything up to the next Sync (so those expectations are dropped);
//! - asynchronous messages (notices, notifications, parameter changes) belong to nobody.
//!
//! Pure: no I/O. A response that fits no expectation is a desync, and the session ends
//! rather than guess (masking depends on knowing which rows belong to what).

use std::{collections::VecDeque, sync::Arc};

use super::messages::be;

/// Why a substituted message was denied: what the client will be told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub rule: String,
    pub message: String,
}

/// The judgement of the statement a response belongs to (for masking its results).
pub type Ctx = Arc<crate::policy::Judgement>;

/// What a forwarded message will be answered with.
#[derive(Clone)]
pub enum Expect {
    /// Simple `Query` (or a substitute for a denied one): results, then ReadyForQuery.
    Query {
        denied: Option<Denial>,
        ctx: Option<Ctx>,
        /// Its text, when it runs (errors are checked against it, see `withhold.rs`).
        sql: Option<Arc<str>>,
    },
    /// `FunctionCall`: FunctionCallResponse or an error, then ReadyForQuery.
    FunctionCall {
        denied: Option<Denial>,
    },
    /// `Parse`: ParseComplete (or the error of a denied statement's substitute). `name`:
    /// the client's statement, when it was forwarded (what the engine keeps of it waits
    /// for the server's answer).
    Parse {
        denied: Option<Denial>,
        name: Option<String>,
    },
    /// `Bind`: the portal, and the judgement of the statement bound to it (or the
    /// error of the unreadable Bind sent for a refused one).
    Bind {
        portal: String,
        ctx: Option<Ctx>,
        /// Which statement of the judgement the portal runs (see `Bound::at`).
        at: usize,
        denied: Option<Denial>,
    },
    /// `Describe` of a statement: ParameterDescription, then RowDescription or NoData.
    DescribeStatement {
        name: String,
        swallow: bool,
    },
    /// `Describe` of a portal: RowDescription or NoData.
    DescribePortal {
        name: String,
        swallow: bool,
    },
    /// `Execute`: rows, then CommandComplete / EmptyQuery / PortalSuspended (or COPY).
    Execute {
        portal: String,
    },
    Close,
    /// `Sync`: ReadyForQuery.
    Sync,
    /// Marker: the client ended a COPY FROM STDIN (CopyDone or CopyFail). Syncs sent before
    /// it, while the server was in copy-in mode, are ignored by the server.
    CopyEnd,
    /// A catalog lookup the engine sent on the session's connection, between the client's
    /// requests (`inband.rs`): everything up to its ReadyForQuery is the engine's.
    Catalog,
}

impl std::fmt::Debug for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = match self {
            Self::Query { .. } => "Query",
            Self::FunctionCall { .. } => "FunctionCall",
            Self::Parse { .. } => "Parse",
            Self::Bind { .. } => "Bind",
            Self::DescribeStatement { .. } => "DescribeStatement",
            Self::DescribePortal { .. } => "DescribePortal",
            Self::Execute { .. } => "Execute",
            Self::Close => "Close",
            Self::Sync => "Sync",
            Self::CopyEnd => "CopyEnd",
            Self::Catalog => "Catalog",
        };
        f.write_str(n)
    }
}

/// What to do with a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// Relay it.
    Pass,
    /// Relay it; it belongs to a result (rows, row description, copy) of `owner`.
    Result(Owner),
    /// Replace it with the denial error.
    Deny(Denial),
    /// An answer to a message the engine injected: do not relay.
    Swallow(Owner),
    /// The transaction status of a ReadyForQuery, after which nothing is pending for the
    /// Sync/Query it answered.
    Ready(u8),
    /// BindComplete: a portal now holds this statement.
    Bound(Bound),
}

/// A portal and the judgement of the statement bound to it.
#[derive(Clone, Debug)]
pub struct Bound {
    pub portal: String,
    pub ctx: Option<Ctx>,
    /// Which statement of the judgement the portal runs: 0 for a Parse, the `PREPARE`'s
    /// place in its message for a statement prepared in SQL.
    pub at: usize,
}

impl PartialEq for Bound {
    fn eq(&self, o: &Self) -> bool {
        self.portal == o.portal
            && self.at == o.at
            && match (&self.ctx, &o.ctx) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
    }
}

impl Eq for Bound {}

/// Whose result a message is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The simple query at the head of the queue.
    Query,
    /// A statement being described.
    Statement(String),
    /// A portal being described or executed.
    Portal(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the server sent {tag:?} while the proxy expected {expected}")]
pub struct Desync {
    pub tag: char,
    pub expected: String,
}

#[derive(Default)]
pub struct Tracker {
    queue: VecDeque<Expect>,
    /// A ParameterDescription was seen for the head DescribeStatement.
    described_params: bool,
    /// The server is in copy-in mode and the client has not ended the copy yet.
    copy_in: bool,
    /// An extended-protocol error arrived before the client's Sync did: the server
    /// discards what the client sends until that Sync, so nothing answers it.
    skipping: bool,
    /// Statements of forwarded Parses the server failed or skipped: never made.
    unmade: Vec<String>,
}

impl Tracker {
    pub fn push(&mut self, e: Expect) {
        if self.skipping {
            if !matches!(e, Expect::Sync) {
                if let Expect::Parse { name: Some(n), .. } = e {
                    self.unmade.push(n);
                }
                return;
            }
            self.skipping = false;
        }
        if self.copy_in {
            match e {
                // Ignored by the server during copy-in: no ReadyForQuery will answer it.
                Expect::Sync => return,
                Expect::CopyEnd => {
                    self.copy_in = false;
                    return;
                }
                _ => {}
            }
        }
        self.queue.push_back(e);
    }

    /// The server entered copy-in mode for the head message: the Syncs the client sent
    /// since, up to its CopyDone/CopyFail, will get no answer.
    fn enter_copy_in(&mut self) {
        let mut i = 1;
        while i < self.queue.len() {
            match self.queue[i] {
                Expect::Sync => {
                    self.queue.remove(i);
                }
                Expect::CopyEnd => {
                    self.queue.remove(i);
                    return;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// The server is discarding the client's messages up to its next Sync (an error
    /// came before it): anything sent now would be discarded too.
    pub fn is_skipping(&self) -> bool {
        self.skipping
    }

    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// The context of the query at the head, if it is one.
    /// What the next server message answers.
    pub fn head(&self) -> Option<&Expect> {
        self.queue.front()
    }

    /// Whether a server message answers the engine's own catalog lookup at the head:
    /// `Some(true)` for its ReadyForQuery (the lookup is over), `Some(false)` for the rest
    /// of its answer; `None`: the message is someone else's (asynchronous messages go to
    /// the client even in the middle of a lookup).
    pub fn on_catalog(&mut self, tag: u8) -> Option<bool> {
        if matches!(
            tag,
            be::NOTICE_RESPONSE | be::NOTIFICATION | be::PARAMETER_STATUS
        ) || !matches!(self.queue.front(), Some(Expect::Catalog))
        {
            return None;
        }
        let done = tag == be::READY_FOR_QUERY;
        if done {
            self.queue.pop_front();
        }
        Some(done)
    }

    /// Statements of forwarded Parses that the server failed or skipped since the last
    /// call: they do not exist on the server.
    pub fn take_unmade(&mut self) -> Vec<String> {
        std::mem::take(&mut self.unmade)
    }

    pub fn head_query_ctx(&self) -> Option<&Ctx> {
        match self.queue.front() {
            Some(Expect::Query { ctx, .. }) => ctx.as_ref(),
            _ => None,
        }
    }

    fn desync(&self, tag: u8) -> Desync {
        Desync {
            tag: tag as char,
            expected: self
                .queue
                .front()
                .map_or_else(|| "nothing".to_owned(), |e| format!("{e:?}")),
        }
    }

    /// After an error in the extended protocol the server skips to the next Sync.
    fn skip_to_sync(&mut self) {
        while let Some(e) = self.queue.front() {
            if matches!(
                e,
                Expect::Sync | Expect::Query { .. } | Expect::FunctionCall { .. }
            ) {
                return;
            }
            if let Some(Expect::Parse { name: Some(n), .. }) = self.queue.pop_front() {
                self.unmade.push(n);
            }
        }
        // The client's Sync has not come yet (its messages may arrive in several reads):
        // what it sends before it is discarded by the server too.
        self.skipping = true;
    }

    pub fn on_server(&mut self, tag: u8) -> Result<Route, Desync> {
        // Asynchronous: may arrive at any time.
        if matches!(
            tag,
            be::NOTICE_RESPONSE | be::NOTIFICATION | be::PARAMETER_STATUS
        ) {
            return Ok(Route::Pass);
        }
        // A copy end the server has already accounted for answers nothing.
        while matches!(self.queue.front(), Some(Expect::CopyEnd)) {
            self.queue.pop_front();
        }
        if tag == be::COPY_IN_RESPONSE
            && matches!(
                self.queue.front(),
                Some(Expect::Execute { .. } | Expect::Query { .. })
            )
        {
            self.enter_copy_in();
        }
        let Some(head) = self.queue.front().cloned() else {
            // The server may end a session on its own at any time (idle timeout,
            // pg_terminate_backend): its FATAL error goes to the client.
            if tag == be::ERROR_RESPONSE {
                return Ok(Route::Pass);
            }
            return Err(self.desync(tag));
        };
        use Expect as X;
        let route = match (&head, tag) {
            // ---- simple query and function call: everything until ReadyForQuery
            (X::Query { denied, .. }, be::ERROR_RESPONSE) => match denied {
                Some(d) => Route::Deny(d.clone()),
                None => Route::Pass,
            },
            (X::FunctionCall { denied }, be::ERROR_RESPONSE) => match denied {
                Some(d) => Route::Deny(d.clone()),
                None => Route::Pass,
            },
            (X::Query { .. } | X::FunctionCall { .. } | X::Sync, be::READY_FOR_QUERY) => {
                self.queue.pop_front();
                return Ok(Route::Ready(0));
            }
            (X::FunctionCall { .. }, be::FUNCTION_CALL_RESPONSE) => Route::Pass,
            (
                X::Query { .. },
                be::ROW_DESCRIPTION
                | be::DATA_ROW
                | be::COMMAND_COMPLETE
                | be::EMPTY_QUERY
                | be::COPY_IN_RESPONSE
                | be::COPY_OUT_RESPONSE
                | be::COPY_BOTH_RESPONSE
                | be::COPY_DATA
                | be::COPY_DONE,
            ) => Route::Result(Owner::Query),
            // ---- extended query
            (_, be::ERROR_RESPONSE) => {
                let route = match &head {
                    X::Parse {
                        denied: Some(d), ..
                    }
                    | X::Bind {
                        denied: Some(d), ..
                    } => Route::Deny(d.clone()),
                    _ => Route::Pass,
                };
                self.skip_to_sync();
                self.described_params = false;
                return Ok(route);
            }
            (X::Parse { .. }, be::PARSE_COMPLETE) => {
                self.queue.pop_front();
                Route::Pass
            }
            (
                X::Bind {
                    portal, ctx, at, ..
                },
                be::BIND_COMPLETE,
            ) => {
                let b = Bound {
                    portal: portal.clone(),
                    ctx: ctx.clone(),
                    at: *at,
                };
                self.queue.pop_front();
                Route::Bound(b)
            }
            (X::Close, be::CLOSE_COMPLETE) => {
                self.queue.pop_front();
                Route::Pass
            }
            (X::DescribeStatement { name, swallow }, be::PARAMETER_DESCRIPTION) => {
                self.described_params = true;
                if *swallow {
                    Route::Swallow(Owner::Statement(name.clone()))
                } else {
                    Route::Pass
                }
            }
            (X::DescribeStatement { name, swallow }, be::ROW_DESCRIPTION | be::NO_DATA)
                if self.described_params =>
            {
                self.described_params = false;
                self.queue.pop_front();
                let owner = Owner::Statement(name.clone());
                if *swallow {
                    Route::Swallow(owner)
                } else {
                    Route::Result(owner)
                }
            }
            (X::DescribePortal { name, swallow }, be::ROW_DESCRIPTION | be::NO_DATA) => {
                self.queue.pop_front();
                let owner = Owner::Portal(name.clone());
                if *swallow {
                    Route::Swallow(owner)
                } else {
                    Route::Result(owner)
                }
            }
            (
                X::Execute { portal },
                be::DATA_ROW
                | be::COPY_IN_RESPONSE
                | be::COPY_OUT_RESPONSE
                | be::COPY_BOTH_RESPONSE
                | be::COPY_DATA
                | be::COPY_DONE,
            ) => Route::Result(Owner::Portal(portal.clone())),
            (
                X::Execute { portal },
                be::COMMAND_COMPLETE | be::EMPTY_QUERY | be::PORTAL_SUSPENDED,
            ) => {
                let p = portal.clone();
                self.queue.pop_front();
                Route::Result(Owner::Portal(p))
            }
            _ => return Err(self.desync(tag)),
        };
        Ok(route)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deny() -> Option<Denial> {
        Some(Denial {
            rule: "r".into(),
            message: "no".into(),
        })
    }

    /// A Bind of the unnamed portal, refused or not.
    fn unnamed_bind(denied: Option<Denial>) -> Expect {
        Expect::Bind {
            portal: String::new(),
            ctx: None,
            at: 0,
            denied,
        }
    }

    fn feed(t: &mut Tracker, tags: &[u8]) -> Vec<Route> {
        tags.iter()
            .map(|&g| t.on_server(g).expect("in sync"))
            .collect()
    }

    #[test]
    fn simple_query_results_then_ready() {
        let mut t = Tracker::default();
        t.push(Expect::Query {
            denied: None,
            ctx: None,
            sql: None,
        });
        let r = feed(&mut t, b"TDDCNTDCZ");
        assert_eq!(r[0], Route::Result(Owner::Query));
        assert_eq!(r[4], Route::Pass, "notice");
        assert_eq!(r[8], Route::Ready(0));
        assert!(t.is_idle());
    }

    #[test]
    fn the_engines_catalog_lookup_is_its_own_and_the_client_comes_after() {
        let mut t = Tracker::default();
        t.push(Expect::Catalog);
        t.push(Expect::Query {
            denied: None,
            ctx: None,
            sql: None,
        });
        // Its answer, an error included (the server skips to the lookup's own Sync), up
        // to its ReadyForQuery; a notice in between is the client's.
        assert_eq!(t.on_catalog(be::PARSE_COMPLETE), Some(false));
        assert_eq!(t.on_catalog(be::NOTICE_RESPONSE), None);
        assert_eq!(t.on_catalog(be::ERROR_RESPONSE), Some(false));
        assert_eq!(t.on_catalog(be::READY_FOR_QUERY), Some(true));
        // Then the client's query, untouched by the lookup's error.
        assert_eq!(t.on_catalog(be::ROW_DESCRIPTION), None);
        let r = feed(&mut t, b"TDCZ");
        assert_eq!(r[0], Route::Result(Owner::Query));
        assert_eq!(r[3], Route::Ready(0));
        assert!(t.is_idle());
    }

    #[test]
    fn a_denied_query_gets_its_error_rewritten() {
        let mut t = Tracker::default();
        t.push(Expect::Query {
            denied: deny(),
            ctx: None,
            sql: None,
        });
        assert_eq!(
            t.on_server(be::ERROR_RESPONSE),
            Ok(Route::Deny(deny().expect("a denial")))
        );
        assert_eq!(t.on_server(be::READY_FOR_QUERY), Ok(Route::Ready(0)));
    }

    #[test]
    fn extended_pipeline_with_a_denied_parse() {
        let mut t = Tracker::default();
        for e in [
            Expect::Parse {
                denied: None,
                name: None,
            },
            unnamed_bind(None),
            Expect::Execute { portal: "".into() },
            Expect::Sync,
            Expect::Parse {
                denied: deny(),
                name: None,
            },
            unnamed_bind(None),
            Expect::Execute { portal: "".into() },
            Expect::Sync,
        ] {
            t.push(e);
        }
        let r = feed(&mut t, b"12DCZ");
        assert_eq!(r[2], Route::Result(Owner::Portal(String::new())));
        assert_eq!(r[4], Route::Ready(0));
        // The substitute fails at Parse; Bind and Execute are skipped by the server.
        assert!(matches!(
            t.on_server(be::ERROR_RESPONSE),
            Ok(Route::Deny(_))
        ));
        assert_eq!(t.on_server(be::READY_FOR_QUERY), Ok(Route::Ready(0)));
        assert!(t.is_idle());
    }

    #[test]
    fn a_refused_bind_gets_its_error_rewritten_and_its_execute_skipped() {
        let mut t = Tracker::default();
        for e in [
            unnamed_bind(deny()),
            Expect::Execute { portal: "".into() },
            Expect::Sync,
            unnamed_bind(None),
            Expect::Execute { portal: "".into() },
            Expect::Sync,
        ] {
            t.push(e);
        }
        // The unreadable Bind fails; the server skips to Sync.
        assert_eq!(
            t.on_server(be::ERROR_RESPONSE),
            Ok(Route::Deny(deny().expect("a denial")))
        );
        assert_eq!(t.on_server(be::READY_FOR_QUERY), Ok(Route::Ready(0)));
        // The next pipeline is in step; an error of an unrefused Bind is the server's.
        assert_eq!(t.on_server(be::ERROR_RESPONSE), Ok(Route::Pass));
        assert_eq!(t.on_server(be::READY_FOR_QUERY), Ok(Route::Ready(0)));
        assert!(t.is_idle());
    }

    #[test]
    fn messages_sent_after_an_error_and_before_the_sync_expect_nothing() {
        let mut t = Tracker::default();
        // The client's Bind went out alone; the server fails it before the rest arrives.
        t.push(unnamed_bind(deny()));
        assert!(matches!(
            t.on_server(be::ERROR_RESPONSE),
            Ok(Route::Deny(_))
        ));
        t.push(Expect::Execute { portal: "".into() });
        t.push(Expect::Parse {
            denied: None,
            name: None,
        });
        t.push(Expect::Sync);
        assert_eq!(t.on_server(be::READY_FOR_QUERY), Ok(Route::Ready(0)));
        assert!(t.is_idle());
        // After the Sync, messages are answered again.
        t.push(Expect::Parse {
            denied: None,
            name: None,
        });
        assert_eq!(t.on_server(be::PARSE_COMPLETE), Ok(Route::Pass));
    }

    #[test]
    fn parses_the_server_failed_or_skipped_are_reported_unmade() {
        let parse = |n: &str| Expect::Parse {
            denied: None,
            name: Some(n.into()),
        };
        let mut t = Tracker::default();
        t.push(parse("a"));
        t.push(parse("b"));
        assert_eq!(t.on_server(be::PARSE_COMPLETE), Ok(Route::Pass));
        assert!(t.take_unmade().is_empty(), "a was made");
        assert_eq!(t.on_server(be::ERROR_RESPONSE), Ok(Route::Pass));
        // c arrives after the error, before the Sync: skipped by the server too.
        t.push(parse("c"));
        t.push(Expect::Sync);
        assert_eq!(t.take_unmade(), ["b", "c"]);
        assert_eq!(t.on_server(be::READY_FOR_QUERY), Ok(Route::Ready(0)));
        assert!(t.is_idle() && t.take_unmade().is_empty());
    }

    #[test]
    fn an_earlier_error_skips_a_later_substitute() {
        let mut t = Tracker::default();
        for e in [
            Expect::Parse {
                denied: None,
                name: None,
            },
            unnamed_bind(None),
            Expect::Execute { portal: "".into() },
            Expect::Parse {
                denied: deny(),
                name: None,
            },
            Expect::Sync,
        ] {
            t.push(e);
        }
        feed(&mut t, b"12");
        // The Execute fails: the server never parses the substitute.
        assert_eq!(
            t.on_server(be::ERROR_RESPONSE),
            Ok(Route::Pass),
            "not rewritten"
        );
        assert_eq!(t.on_server(be::READY_FOR_QUERY), Ok(Route::Ready(0)));
        assert!(t.is_idle());
    }

    #[test]
    fn injected_describes_are_swallowed() {
        let mut t = Tracker::default();
        t.push(Expect::Parse {
            denied: None,
            name: None,
        });
        t.push(Expect::DescribeStatement {
            name: "s".into(),
            swallow: true,
        });
        t.push(Expect::Sync);
        let r = feed(&mut t, b"1tTZ");
        assert_eq!(r[1], Route::Swallow(Owner::Statement("s".into())));
        assert_eq!(r[2], Route::Swallow(Owner::Statement("s".into())));
    }

    #[test]
    fn syncs_sent_during_copy_in_get_no_answer() {
        // tokio-postgres: Bind, Execute, Sync, CopyData..., CopyDone, Sync, before the
        // server's CopyInResponse arrives.
        let mut t = Tracker::default();
        for e in [
            unnamed_bind(None),
            Expect::Execute { portal: "".into() },
            Expect::Sync,
            Expect::CopyEnd,
            Expect::Sync,
        ] {
            t.push(e);
        }
        let r = feed(&mut t, b"2GCZ");
        assert_eq!(r[3], Route::Ready(0));
        assert!(t.is_idle());
        // Or: the CopyInResponse arrives before the client ends the copy.
        let mut t = Tracker::default();
        t.push(Expect::Execute { portal: "".into() });
        t.push(Expect::Sync);
        feed(&mut t, b"G");
        t.push(Expect::Sync); // still copying: ignored by the server
        t.push(Expect::CopyEnd);
        t.push(Expect::Sync);
        let r = feed(&mut t, b"CZ");
        assert_eq!(r[1], Route::Ready(0));
        assert!(t.is_idle());
    }

    #[test]
    fn unexpected_messages_are_a_desync() {
        let mut t = Tracker::default();
        assert!(t.on_server(be::DATA_ROW).is_err(), "rows nobody asked for");
        t.push(unnamed_bind(None));
        assert!(t.on_server(be::PARSE_COMPLETE).is_err());
    }
}
