//! One PostgreSQL session through the gate.
//!
//! Start: client negotiation ([`super::startup`]), checks on the startup parameters, the
//! server connection (with TLS per target), authentication (relayed, or injected with
//! Portcullis's credentials), then the relay.
//!
//! Relay: two pumps run side by side so neither direction can block the other.
//! - Client → server: every statement (simple `Query`, extended `Parse`, SQL `PREPARE`) is
//!   judged by the policy before anything is forwarded. A denied message is replaced by a
//!   harmless one that makes the server raise an error (a constant cast that fails at parse
//!   analysis), so the server's own rules give the session exactly the state it would have
//!   had if it had refused the statement: an error inside a transaction block aborts it, a
//!   pipeline skips to its Sync. The denied text never reaches the server.
//! - Server → client: each response is paired with the message it answers
//!   ([`super::expect`]); the error of a substitute is rewritten into the denial
//!   (SQLSTATE 42501, naming the rule). Results are streamed message by message.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::io::{
    AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadHalf, WriteHalf,
};
use tokio_util::sync::CancellationToken;

use super::{
    PgError, PgShared,
    approval::{ApprovalOutcome, ApprovalRequest},
    auth,
    catalog::{self, Catalog, CatalogKey},
    codec::{Frame, SSL_REQUEST, Startup, decode},
    expect::{Denial, Expect, Owner, Route, Tracker},
    inband,
    listens::{Listens, Notify},
    messages::{self, Notice, Parse, auth_codes, be, fe},
    results::{self, ResultMasking},
    startup::{self, Accepted},
    stream::Stream,
};
use crate::{
    config::{PgAuth, PgTarget, TokenExpiry, TokenMode, UpstreamTls},
    masking::{copies::Redefined, plan::Refusal, value::Masker},
    oidc::OidcIdentity,
    policy::model::MaskSpec,
    policy::{
        Judgement, PolicyStore, Subject, Verdict,
        cache::ClassKey,
        sql::{Kind, LexOptions},
    },
    protocol::{ConnContext, End, Outcome, Session, Traffic},
    proxy::upstream::Upstream,
};

/// What a denied statement is replaced with: valid SQL that fails during parse analysis,
/// before anything executes, with no side effect. Schema-qualified so no search_path can
/// redirect it; no backslash, so it reads the same whatever standard_conforming_strings is.
pub const DENIED_SQL: &str = "SELECT 'portcullis: statement refused by policy'::pg_catalog.int4";

/// Rule id reported when the audit store cannot record a statement.
pub const STORE_RULE: &str = "audit-store";

/// Rule id reported for the function-call sub-protocol, which is always refused.
pub const FUNCTION_CALL_RULE: &str = "function-call-protocol";

/// Writes are batched; a batch is written out once it reaches this size.
const WRITE_BATCH: usize = 64 * 1024;

pub async fn run(shared: Arc<PgShared>, s: Session) -> Outcome {
    let Session {
        client,
        ctx,
        upstream,
        traffic,
        shutdown,
    } = s;
    let client_sock = socket2::SockRef::from(&client).try_clone().ok();
    match session(&shared, client, &ctx, &upstream, &traffic, &shutdown).await {
        Ok(outcome) => outcome,
        Err(e) => {
            let end = match &e {
                PgError::ClientGone => End::Closed,
                PgError::ClientIo(_) | PgError::ClientTls(_) | PgError::ClientStalled(_) => {
                    End::ClientReset
                }
                PgError::Upstream(_) => End::UpstreamUnreachable,
                PgError::ServerIo(_) => End::UpstreamReset,
                PgError::Refused(_) | PgError::ServerRefused(_) | PgError::Auth(_) => End::Refused,
                _ => End::ProtocolError,
            };
            if matches!(end, End::ProtocolError | End::UpstreamUnreachable)
                && let Some(sock) = client_sock
            {
                let _ = sock.set_linger(Some(Duration::ZERO));
            }
            tracing::info!(conn.id = ctx.id, error = %e, "postgres session ended");
            Outcome::new(end, Some(e.to_string()))
        }
    }
}

/// Framed reading from one side.
pub(crate) struct Reader<R> {
    pub(crate) r: R,
    buf: BytesMut,
    max: usize,
    client: bool,
    /// For the client side: how long a started message may take to arrive in full.
    stall: Option<Duration>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub(crate) fn new(r: R, buf: BytesMut, max: usize, client: bool) -> Self {
        Self {
            r,
            buf,
            max,
            client,
            stall: None,
        }
    }

    fn with_stall(mut self, stall: Duration) -> Self {
        self.stall = Some(stall);
        self
    }

    fn proto_err(&self, e: super::codec::FrameError) -> PgError {
        if self.client {
            PgError::ClientProtocol(e)
        } else {
            PgError::ServerProtocol(e)
        }
    }

    /// Decodes what is buffered; `None` when more must be read.
    fn try_frame(&mut self) -> Result<Option<Frame>, PgError> {
        decode(&mut self.buf, self.max).map_err(|e| self.proto_err(e))
    }

    /// Reads more; `false` on a clean EOF.
    /// Bytes read and not yet framed.
    fn buffered(&self) -> usize {
        self.buf.len()
    }

    async fn fill(&mut self) -> Result<bool, PgError> {
        if self.buf.capacity() - self.buf.len() < 8192 {
            self.buf.reserve(8192);
        }
        let client = self.client;
        let partial = !self.buf.is_empty();
        let read = self.r.read_buf(&mut self.buf);
        let n = match self.stall {
            // Part of a message is buffered: the rest must come in time.
            Some(t) if partial => tokio::time::timeout(t, read)
                .await
                .map_err(|_| PgError::ClientStalled(t))?,
            _ => read.await,
        }
        .map_err(|e| {
            if client {
                PgError::ClientIo(e)
            } else {
                PgError::ServerIo(e)
            }
        })?;
        Ok(n > 0)
    }

    pub(crate) async fn frame(&mut self) -> Result<Frame, PgError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            if !self.fill().await? {
                return Err(if self.client {
                    PgError::ClientGone
                } else {
                    PgError::ServerIo(std::io::ErrorKind::UnexpectedEof.into())
                });
            }
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(
    w: &mut W,
    frames: &[Frame],
    client: bool,
) -> Result<(), PgError> {
    let mut b = BytesMut::new();
    for f in frames {
        f.encode(&mut b);
    }
    w.write_all(&b).await.map_err(|e| {
        if client {
            PgError::ClientIo(e)
        } else {
            PgError::ServerIo(e)
        }
    })
}

fn fatal(code: &'static str, message: String) -> Frame {
    Notice {
        severity: "FATAL",
        code,
        message,
        detail: None,
        hint: None,
    }
    .error()
}

/// Tells the client why its session ends (FATAL `code`, `portcullis: why`). The session is
/// over either way, so a failed write does not matter.
async fn tell_fatal<W: AsyncWrite + Unpin>(w: &mut W, code: &'static str, why: &str) {
    let _ = send(w, &[fatal(code, format!("portcullis: {why}"))], true).await;
}

fn denial_error(d: &Denial) -> Frame {
    Notice {
        severity: "ERROR",
        code: "42501",
        message: format!("portcullis: {}", d.message),
        detail: Some(format!("Refused by Portcullis policy rule \"{}\".", d.rule)),
        hint: Some(
            "The statement was not sent to the server. See `portcullis policy explain` on \
             the host for why."
                .into(),
        ),
    }
    .error()
}

/// What a ParameterStatus from the server changes in how statements are read.
fn note_parameter(lex: &mut LexOptions, name: &str, value: &str) {
    match name {
        "standard_conforming_strings" => lex.standard_conforming_strings = value == "on",
        "client_encoding" => lex.multibyte_ascii = crate::policy::sql::lex::swallows_ascii(value),
        _ => {}
    }
}

/// The process behind the connection as the rules see it; a token's identity is added
/// once one is accepted.
fn subject_of(ctx: &ConnContext) -> Subject {
    let who = &ctx.identity;
    Subject {
        agent: ctx.agent.name.clone(),
        uid: who.uid,
        user: who.user.clone(),
        unit: who.cgroup_info.unit.clone(),
        exe: who.exe.as_ref().map(|p| p.display().to_string()),
        cgroup: who.cgroup.clone(),
        oidc: None,
    }
}

pub(crate) async fn connect_server(
    shared: &PgShared,
    target: &str,
    pg: &PgTarget,
    upstream: &Upstream,
) -> Result<Stream, PgError> {
    let mut tcp = upstream.connect().await?;
    let Some(tls) = shared.upstream_tls(target, pg)? else {
        return Ok(Stream::Plain(tcp));
    };
    let req = Startup::SslRequest.encode();
    debug_assert_eq!(&req[4..8], &SSL_REQUEST.to_be_bytes());
    tcp.write_all(&req).await.map_err(PgError::ServerIo)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(PgError::ServerIo)?;
    match answer[0] {
        b'S' => {
            let name = pg
                .upstream_server_name
                .clone()
                .unwrap_or_else(|| upstream.addr.ip().to_string());
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| PgError::ServerTls(e.to_string()))?;
            let t = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| PgError::ServerTls(e.to_string()))?;
            Ok(Stream::ToServer(Box::new(t)))
        }
        b'N' if pg.upstream_tls == UpstreamTls::Prefer => Ok(Stream::Plain(tcp)),
        b'N' => Err(PgError::ServerTls(
            "the server does not offer TLS but the target requires it".into(),
        )),
        other => Err(PgError::ServerTls(format!(
            "unexpected answer {other:#x} to SSLRequest"
        ))),
    }
}

/// Removes `SCRAM-SHA-256-PLUS` from an AuthenticationSASL list: channel binding cannot
/// cross the proxy (the client would bind to Portcullis's TLS, the server checks its own).
fn without_channel_binding(body: &[u8]) -> Bytes {
    let mut out = BytesMut::from(&body[..4]);
    for mech in body[4..].split(|&b| b == 0).filter(|m| !m.is_empty()) {
        if mech != b"SCRAM-SHA-256-PLUS" {
            out.extend_from_slice(mech);
            out.extend_from_slice(&[0]);
        }
    }
    out.extend_from_slice(&[0]);
    out.freeze()
}

async fn session(
    shared: &Arc<PgShared>,
    client_tcp: tokio::net::TcpStream,
    ctx: &Arc<ConnContext>,
    upstream: &Upstream,
    traffic: &Arc<Traffic>,
    shutdown: &CancellationToken,
) -> Result<Outcome, PgError> {
    let pg = ctx.target.pg.clone().ok_or_else(|| {
        PgError::Config(format!(
            "target {} has no postgres settings",
            ctx.target.name
        ))
    })?;
    let (mut client, version, mut params, leftover) = match startup::accept(
        client_tcp,
        shared.client_tls.as_ref(),
        pg.stall_timeout.get(),
    )
    .await?
    {
        Accepted::Cancel { pid, key } => {
            super::cancel::forward(&shared.cancels, upstream, pid, key).await;
            return Ok(Outcome::new(End::Closed, None));
        }
        Accepted::Session {
            client,
            version,
            params,
            leftover,
        } => (client, version, params, leftover),
    };
    if let Err(why) = super::params::check(&params) {
        tell_fatal(&mut client, "42501", &why).await;
        return Err(PgError::Refused(why));
    }
    let client_user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let database = params
        .iter()
        .find(|(k, _)| k == "database")
        .map_or_else(|| client_user.clone(), |(_, v)| v.clone());
    let creds = pg.credentials.clone();
    if pg.auth == PgAuth::Inject {
        let user = creds.as_ref().map(|c| c.user.clone()).unwrap_or_default();
        params.retain(|(k, _)| k != "user");
        params.insert(0, ("user".into(), user));
        if !params.iter().any(|(k, _)| k == "database") {
            params.push(("database".into(), database.clone()));
        }
    }
    let mut client = Reader::new(client, leftover, pg.max_message_size, true);
    let mut subject = subject_of(ctx);
    // A token is asked for and checked before any server connection is opened.
    let token = if pg.auth == PgAuth::Inject && pg.token != TokenMode::Off {
        client_token(shared, &mut client, ctx, &subject, &pg).await?
    } else {
        None
    };
    let server = match connect_server(shared, &ctx.target.name, &pg, upstream).await {
        Ok(s) => s,
        Err(e) => {
            tell_fatal(
                &mut client.r,
                "08006",
                &format!("cannot reach the server: {e}"),
            )
            .await;
            return Err(e);
        }
    };
    let mut server = Reader::new(
        server,
        BytesMut::with_capacity(16 * 1024),
        pg.max_message_size,
        false,
    );
    server
        .r
        .write_all(&Startup::Startup { version, params }.encode())
        .await
        .map_err(PgError::ServerIo)?;

    // ---- authentication
    match pg.auth {
        PgAuth::Passthrough => relay_auth(&mut client, &mut server).await?,
        PgAuth::Inject => {
            let creds =
                creds.ok_or_else(|| PgError::Config("inject without credentials".into()))?;
            if let Err(e) = inject_auth(&mut server, &creds).await {
                tell_fatal(
                    &mut client.r,
                    "28000",
                    &format!("could not authenticate to the server: {e}"),
                )
                .await;
                return Err(e);
            }
            tracing::info!(conn.id = ctx.id, db.user = %creds.user, agent.name = %ctx.agent.name, "injected credentials");
            send(&mut client.r, &[messages::auth(auth_codes::OK, &[])], true).await?;
        }
    }

    // ---- until the first ReadyForQuery: parameters and the backend key
    let mut lex = LexOptions::default();
    let mut superuser = false;
    let mut key: Option<(i32, Bytes)> = None;
    loop {
        let f = server.frame().await?;
        match f.tag {
            be::PARAMETER_STATUS => {
                if let Ok((k, v)) = messages::parameter_status(&f.body) {
                    superuser |= k == "is_superuser" && v == "on";
                    note_parameter(&mut lex, &k, &v);
                }
            }
            be::BACKEND_KEY_DATA => key = messages::backend_key(&f.body).ok(),
            be::ERROR_RESPONSE => {
                send(&mut client.r, &[f], true).await?;
                return Err(PgError::ServerRefused(
                    "error before the session was ready".into(),
                ));
            }
            _ => {}
        }
        let ready = f.tag == be::READY_FOR_QUERY;
        send(&mut client.r, &[f], true).await?;
        if ready {
            break;
        }
    }
    if superuser {
        // The role the session runs as on the server.
        let role = match (&pg.auth, &pg.credentials) {
            (PgAuth::Inject, Some(c)) => &c.user,
            _ => &client_user,
        };
        shared.superuser_session(&ctx.target.name, role, &ctx.agent.name);
    }
    let _cancel_guard = key.map(|(pid, k)| shared.cancels.insert(pid, k, upstream.addr));
    tracing::debug!(conn.id = ctx.id, db = %database, "postgres session ready");

    // ---- relay
    let token_deadline = token.as_ref().and_then(|id| {
        (pg.token_expiry == TokenExpiry::EndSession).then(|| {
            let leeway = shared
                .tokens
                .load()
                .leeway(&id.issuer)
                .map_or(0, |l| l.as_secs() as i64);
            id.expires_at + leeway
        })
    });
    subject.oidc = token;
    let class = shared
        .policy
        .class_of(&subject, &ctx.target.name, ctx.target.protocol.as_str());
    let state = Arc::new(Mutex::new(State {
        tracker: Tracker::default(),
        prepared: HashMap::new(),
        portals: HashMap::new(),
        recorded: 0,
        lex,
        received_at: None,
        sent_at: None,
        redefined: Redefined::default(),
        listens: Listens::default(),
        system_names: true,
        status: b'I',
        lookup: None,
        idle: Arc::new(tokio::sync::Notify::new()),
    }));
    let catalog = shared.catalogs.get(
        CatalogKey {
            addr: upstream.addr,
            database: database.clone(),
            target: ctx.target.name.clone(),
        },
        &pg,
        upstream,
    );
    let judge = JudgeCtx {
        policy: shared.policy.clone(),
        subject,
        class,
        target: ctx.target.name.clone(),
        protocol: ctx.target.protocol.as_str(),
        catalog: catalog.clone(),
        token_deadline,
        redact_all: shared.store.config().redact_literals,
        statements: [
            Verdict::Allow,
            Verdict::Mask,
            Verdict::RequireApproval,
            Verdict::Deny,
        ]
        .map(|v| {
            crate::metrics::get().statements.with_label_values(&[
                ctx.agent.name.as_str(),
                ctx.target.name.as_str(),
                v.as_str(),
            ])
        }),
    };
    let Reader {
        r: cs,
        buf: cbuf,
        max,
        ..
    } = client;
    let Reader {
        r: ss, buf: sbuf, ..
    } = server;
    let (c_read, c_write) = tokio::io::split(cs);
    let (s_read, s_write) = tokio::io::split(ss);
    let c_write = Arc::new(tokio::sync::Mutex::new(c_write));
    let upward = client_to_server(
        Reader::new(c_read, cbuf, max, true).with_stall(pg.stall_timeout.get()),
        s_write,
        c_write.clone(),
        state.clone(),
        &judge,
        shared,
        ctx,
        traffic,
    );
    let downward = server_to_client(
        Reader::new(s_read, sbuf, max, false),
        c_write,
        state,
        &judge,
        ResultMasking::new(shared.clone(), ctx.session, catalog),
        traffic,
        &ctx.target.name,
    );
    tokio::pin!(upward, downward);
    let end = tokio::select! {
        r = &mut upward => r,
        r = &mut downward => r,
        () = shutdown.cancelled() => Ok(End::Shutdown),
    };
    end.map(|e| Outcome::new(e, None))
}

/// Largest PasswordMessage read when a token is asked for (the server's own limit for
/// authentication messages is 65535 bytes too).
const MAX_PASSWORD_MESSAGE: usize = 65_535;

/// Inject mode with tokens: asks the client for its password (cleartext: the connection is
/// on this host, or TLS-wrapped by the client) and validates it as an OIDC token. Returns
/// the identity it proves; `None` when tokens are optional and the password is not one.
/// The token itself is never logged, recorded or kept.
async fn client_token<R: AsyncRead + AsyncWrite + Unpin>(
    shared: &PgShared,
    client: &mut Reader<R>,
    ctx: &ConnContext,
    who: &Subject,
    pg: &PgTarget,
) -> Result<Option<Arc<OidcIdentity>>, PgError> {
    send(
        &mut client.r,
        &[messages::auth(auth_codes::CLEARTEXT, &[])],
        true,
    )
    .await?;
    // A password message is small: a longer one is refused before it is buffered.
    let max = std::mem::replace(&mut client.max, MAX_PASSWORD_MESSAGE);
    let f = tokio::time::timeout(pg.stall_timeout.get(), client.frame()).await;
    client.max = max;
    let f = match f.map_err(|_| PgError::ClientStalled(pg.stall_timeout.get()))? {
        Ok(f) => f,
        Err(PgError::ClientProtocol(e)) => {
            startup::refuse(&mut client.r, &format!("password message: {e}")).await;
            return Err(PgError::ClientProtocol(e));
        }
        Err(e) => return Err(e),
    };
    if f.tag != fe::PASSWORD {
        return Err(PgError::Refused(format!(
            "expected a password message, got {:?}",
            char::from(f.tag)
        )));
    }
    let password = messages::password_text(&f.body).map_err(PgError::ClientProtocol)?;
    let refuse = async |client: &mut Reader<R>, why: String| {
        tell_fatal(&mut client.r, "28000", &why).await;
        PgError::Refused(why)
    };
    // Required: anything with a dot is checked as a token, for a precise error.
    let token_shaped = match pg.token {
        TokenMode::Required => password.contains('.'),
        _ => crate::oidc::claims::looks_like_jwt(password),
    };
    if !token_shaped {
        if pg.token == TokenMode::Required {
            tracing::warn!(conn.id = ctx.id, agent.name = %ctx.agent.name, target.name = %ctx.target.name, reason = "no_token", "connection refused: no OIDC token");
            crate::metrics::get()
                .tokens
                .with_label_values(&["no_token"])
                .inc();
            let why = format!(
                "target {} requires an OIDC token as the password",
                ctx.target.name
            );
            return Err(refuse(client, why).await);
        }
        return Ok(None);
    }
    let tokens = shared.tokens.load_full();
    match tokens
        .validate(password, who, crate::store::now_us() / 1_000_000)
        .await
    {
        Ok(id) => {
            crate::metrics::get()
                .tokens
                .with_label_values(&["accepted"])
                .inc();
            tracing::info!(
                conn.id = ctx.id,
                agent.name = %ctx.agent.name,
                oidc.issuer = %id.issuer,
                oidc.sub = %id.sub,
                oidc.groups = ?id.groups,
                "OIDC token accepted"
            );
            let id = Arc::new(id);
            shared
                .store
                .append(crate::store::Append {
                    session: ctx.session,
                    kind: "identity",
                    body: serde_json::json!({ "oidc": &*id }).into(),
                    at_us: crate::store::now_us(),
                })
                .map_err(|e| PgError::Store(format!("cannot record the token's identity: {e}")))?;
            Ok(Some(id))
        }
        Err(e) => {
            crate::metrics::get()
                .tokens
                .with_label_values(&[e.kind()])
                .inc();
            tracing::warn!(conn.id = ctx.id, agent.name = %ctx.agent.name, target.name = %ctx.target.name, reason = e.kind(), error = %e, "connection refused: OIDC token not accepted");
            Err(refuse(client, format!("OIDC token refused: {e}")).await)
        }
    }
}

/// Passthrough: the server's authentication requests go to the client and the client's
/// answers to the server, verbatim, until the server says OK (or refuses).
async fn relay_auth(
    client: &mut Reader<Stream>,
    server: &mut Reader<Stream>,
) -> Result<(), PgError> {
    loop {
        let f = server.frame().await?;
        match f.tag {
            be::AUTHENTICATION => {
                let (code, _) = messages::auth_code(&f.body).map_err(PgError::ServerProtocol)?;
                let f = if code == auth_codes::SASL {
                    Frame::new(be::AUTHENTICATION, without_channel_binding(&f.body))
                } else {
                    f
                };
                send(&mut client.r, &[f], true).await?;
                match code {
                    auth_codes::OK => return Ok(()),
                    auth_codes::SASL_FINAL => {}
                    auth_codes::CLEARTEXT
                    | auth_codes::MD5
                    | auth_codes::SASL
                    | auth_codes::SASL_CONTINUE => {
                        let answer = client.frame().await?;
                        if answer.tag != fe::PASSWORD {
                            return Err(PgError::ClientProtocol(
                                super::codec::FrameError::Malformed {
                                    what: "authentication",
                                    why: format!(
                                        "expected a password message, got {:?}",
                                        answer.tag as char
                                    ),
                                },
                            ));
                        }
                        send(&mut server.r, &[answer], false).await?;
                    }
                    other => return Err(PgError::Auth(auth::AuthError::Unsupported(other))),
                }
            }
            be::ERROR_RESPONSE => {
                send(&mut client.r, &[f], true).await?;
                return Err(PgError::ServerRefused("authentication failed".into()));
            }
            be::NEGOTIATE_PROTOCOL | be::NOTICE_RESPONSE => send(&mut client.r, &[f], true).await?,
            other => {
                return Err(PgError::ServerProtocol(
                    super::codec::FrameError::Malformed {
                        what: "authentication",
                        why: format!("unexpected message {:?}", other as char),
                    },
                ));
            }
        }
    }
}

/// Inject: Portcullis answers the server's requests with the credentials it holds. The
/// client is not asked for a password; whatever it sends later is never forwarded.
pub(crate) async fn inject_auth<R: AsyncRead + AsyncWrite + Unpin>(
    server: &mut Reader<R>,
    creds: &crate::config::Credentials,
) -> Result<(), PgError> {
    let password = auth::password(creds)?;
    let mut scram: Option<auth::Scram> = None;
    loop {
        let f = server.frame().await?;
        match f.tag {
            be::AUTHENTICATION => {
                let (code, data) = messages::auth_code(&f.body).map_err(PgError::ServerProtocol)?;
                let reply = match code {
                    auth_codes::OK => return Ok(()),
                    auth_codes::CLEARTEXT => Some(auth::password_message(&password)),
                    auth_codes::MD5 => {
                        let salt = data.get(..4).ok_or_else(|| {
                            PgError::ServerProtocol(super::codec::FrameError::Malformed {
                                what: "AuthenticationMD5Password",
                                why: "no salt".into(),
                            })
                        })?;
                        Some(auth::password_message(&auth::md5_response(
                            &creds.user,
                            &password,
                            salt,
                        )))
                    }
                    auth_codes::SASL => {
                        let offered = data
                            .split(|&b| b == 0)
                            .any(|m| m == auth::Scram::MECHANISM.as_bytes());
                        if !offered {
                            return Err(PgError::Auth(auth::AuthError::Scram(
                                "SCRAM-SHA-256 not offered".into(),
                            )));
                        }
                        let s = auth::Scram::new(&password);
                        let first = s.initial();
                        scram = Some(s);
                        Some(first)
                    }
                    auth_codes::SASL_CONTINUE => {
                        let s = scram.as_mut().ok_or_else(|| {
                            PgError::Auth(auth::AuthError::Scram("SASLContinue before SASL".into()))
                        })?;
                        Some(s.respond(data)?)
                    }
                    auth_codes::SASL_FINAL => {
                        scram
                            .as_ref()
                            .ok_or_else(|| {
                                PgError::Auth(auth::AuthError::Scram(
                                    "SASLFinal before SASL".into(),
                                ))
                            })?
                            .verify(data)?;
                        None
                    }
                    other => return Err(PgError::Auth(auth::AuthError::Unsupported(other))),
                };
                if let Some(r) = reply {
                    send(&mut server.r, &[r], false).await?;
                }
            }
            be::ERROR_RESPONSE => {
                let msg = messages::error_fields(&f.body)
                    .ok()
                    .and_then(|fs| fs.into_iter().find(|(c, _)| *c == b'M').map(|(_, m)| m))
                    .unwrap_or_default();
                return Err(PgError::ServerRefused(msg));
            }
            be::NEGOTIATE_PROTOCOL | be::NOTICE_RESPONSE => {}
            other => {
                return Err(PgError::ServerProtocol(
                    super::codec::FrameError::Malformed {
                        what: "authentication",
                        why: format!("unexpected message {:?}", other as char),
                    },
                ));
            }
        }
    }
}

/// What the session remembers across messages.
struct State {
    tracker: Tracker,
    /// Prepared statements, by name: one namespace on the server for both ways of
    /// making them (a Parse binds with SQL `EXECUTE`, a `PREPARE` with a Bind).
    prepared: HashMap<String, Prepared>,
    /// Portals: the statement each one holds, for the records of their executions.
    portals: HashMap<String, Portal>,
    /// Statements recorded in this session.
    recorded: u64,
    /// How the server reads text: its standard_conforming_strings and client_encoding.
    lex: LexOptions,
    /// When the oldest request not yet answered by ReadyForQuery arrived from the client,
    /// and when it was forwarded (latency metrics).
    received_at: Option<std::time::Instant>,
    sent_at: Option<std::time::Instant>,
    /// Relations whose definitions statements sent since the session was last idle outside
    /// a transaction may have changed (DDL, DO, CALL): the catalog may not show what their
    /// names mean to this session.
    redefined: Redefined,
    /// The `LISTEN`s the session sent: what notifications it receives get.
    listens: Listens,
    /// Nothing the session sent may have created or renamed a relation or put a schema
    /// before `pg_catalog` in its search path, so an unqualified name of one of
    /// `pg_catalog`'s relations still names it (no temporary relation or other schema's of
    /// that name is searched first): what masking may assume without a catalog connection
    /// ([`crate::masking::plan::NoCatalog`]). Once false, false for the session.
    system_names: bool,
    /// The transaction status of the last ReadyForQuery the client was sent.
    status: u8,
    /// The engine's own catalog lookup in flight on this connection ([`inband`]).
    lookup: Option<inband::Waiting>,
    /// Told when every answer to what was forwarded has come back.
    idle: Arc<tokio::sync::Notify>,
}

/// A statement prepared in the session (a Parse, or an SQL-level PREPARE): its text and
/// the decision it was prepared under, with the policy generation that decision came
/// from. After a policy change it is judged again before it runs ([`rejudge`]).
#[derive(Clone)]
struct Prepared {
    sql: Arc<str>,
    judgement: Arc<Judgement>,
    generation: u64,
    /// Which statement of the judgement it is: 0 for a Parse; for a `PREPARE`, its place
    /// in the message it came in.
    at: usize,
    /// The server said it made it (ParseComplete; the PREPARE's query ended without an
    /// error). Until then a failure forgets it, so that the client may prepare the name
    /// again.
    confirmed: bool,
}

impl Prepared {
    /// As it is prepared: not yet confirmed by the server.
    fn new(sql: Arc<str>, judgement: Arc<Judgement>, generation: u64, at: usize) -> Self {
        Self {
            sql,
            judgement,
            generation,
            at,
            confirmed: false,
        }
    }
}

impl State {
    /// The record of `stmt`, numbered as the session's next.
    fn record(&mut self, stmt: &Stmt, session: i64, redact: bool) -> crate::store::Append {
        self.recorded += 1;
        stmt.record(self.recorded, session, redact)
    }

    /// A prepared statement's judgement and place, for masking its results.
    fn prepared_ctx(&self, name: &str) -> Option<(Arc<Judgement>, usize)> {
        self.prepared.get(name).map(|p| (p.judgement.clone(), p.at))
    }
}

/// A bound portal: the statement it runs and the decision that lets it (or the refusal
/// its Bind got, which its Execute records).
struct Portal {
    sql: Arc<str>,
    judgement: Option<Arc<Judgement>>,
    refused: Option<Denial>,
    /// For a masked portal: its statement and the parameters the client sent as text,
    /// the text its errors may quote (see `withhold`).
    sent: Option<Arc<str>>,
}

struct JudgeCtx {
    policy: Arc<PolicyStore>,
    subject: Subject,
    class: ClassKey,
    target: String,
    protocol: &'static str,
    /// Where masking looks names up: a connection of Portcullis's own, or this session's.
    catalog: Arc<Catalog>,
    /// Unix seconds after which the session's token has expired (with `token_expiry =
    /// "end_session"`): the next statement ends the session.
    token_deadline: Option<i64>,
    /// `[store] redact_literals`: statement text is logged and recorded without literals.
    redact_all: bool,
    /// `portcullis_statements_total` for this agent and target, one counter per verdict
    /// (looked up once per session, not per statement).
    statements: [prometheus::IntCounter; 4],
}

impl JudgeCtx {
    /// A statement as log events show it: shortened, and without its literals when the
    /// store or the deciding rule asks for that.
    fn shown(&self, sql: &str, d: &crate::policy::Decision) -> String {
        if self.redact_all || d.redact_literals {
            truncate(&crate::store::redact::redact_literals(sql), 200)
        } else {
            truncate(sql, 200)
        }
    }

    /// The policy generation; read before judging, it is at most the one a judgement
    /// came from (so a reload in between makes the statement judged again, never missed).
    fn generation(&self) -> u64 {
        self.policy.generation()
    }

    fn judge(&self, sql: &str, lex: LexOptions) -> Arc<Judgement> {
        let began = std::time::Instant::now();
        let j = self.policy.judge_sql(
            self.class,
            &self.subject,
            &self.target,
            self.protocol,
            sql,
            lex,
        );
        crate::metrics::get()
            .decision_seconds
            .observe(began.elapsed().as_secs_f64());
        j
    }
}

fn denial_of(j: &Judgement) -> Denial {
    Denial {
        rule: j.decision.rule.clone(),
        message: j
            .decision
            .message
            .clone()
            .unwrap_or_else(|| format!("refused by policy rule {}", j.decision.rule)),
    }
}

/// Whether a statement's masks cannot be honoured (binary COPY; undecidable columns
/// under `unresolved = "deny"`): the denial to send instead of running it.
fn unmaskable(st: &State, j: &Arc<Judgement>) -> Option<Denial> {
    if j.decision.masks.is_empty()
        && !j
            .classification
            .statements
            .iter()
            .any(|s| matches!(s.shape, crate::policy::sql::lineage::Shape::Execute(_)))
    {
        return None;
    }
    let prepared = |n: &str| st.prepared_ctx(n);
    for k in 0..j.classification.statements.len() {
        let Some(a) = results::applies(j, k, &prepared) else {
            continue;
        };
        if let Err(r) = crate::masking::plan::precheck(&a.masks, a.shape()) {
            return Some(denial_of_refusal(&r));
        }
    }
    None
}

/// For a catalog asked on the session's own connection, which nothing can be asked while
/// results stream: the names masking will look for when the results of `j` (statement
/// `at`, or all of them) arrive that the catalog has not cached, to be asked before the
/// message is forwarded. `None`: nothing to ask (or a denied statement, which never runs).
fn masking_names(
    st: &State,
    judge: &JudgeCtx,
    j: &Arc<Judgement>,
    at: Option<usize>,
) -> Option<Vec<String>> {
    if !judge.catalog.in_session() || j.decision.verdict == Verdict::Deny {
        return None;
    }
    let prepared = |n: &str| st.prepared_ctx(n);
    let mut names = Vec::new();
    let all = 0..j.classification.statements.len();
    for k in at.map_or(all, |k| k..k + 1) {
        let Some(a) = results::applies(j, k, &prepared) else {
            continue;
        };
        if a.masks.iter().any(|m| !m.columns.is_empty()) {
            names.extend(results::wanted(a.shape(), &[]).1);
        }
    }
    let unknown = judge.catalog.unknown_names(&names);
    (!unknown.is_empty()).then_some(unknown)
}

/// What masking knows without a catalog connection when it judges `j`: unqualified names
/// of `pg_catalog`'s relations are theirs only if neither the session before nor the
/// message itself may have made them name another relation.
fn no_catalog(st: &State, j: &Judgement) -> crate::masking::plan::NoCatalog {
    crate::masking::plan::NoCatalog {
        unqualified: st.system_names && !shadows_catalog(j),
    }
}

/// Whether after a judged message an unqualified catalog name may name another relation
/// (one that cannot be classified may do anything).
fn shadows_catalog(j: &Judgement) -> bool {
    j.classification.error.is_some()
        || j.classification
            .statements
            .iter()
            .any(crate::policy::sql::StatementClass::may_shadow_catalog)
}

/// Whether a message copies a masked column where no mask covers it
/// ([`crate::masking::copies`]), judged with what the catalog has cached. Without a
/// catalog nothing can be verified: a copy of any column into a place no mask covers is
/// refused (as reads of table columns are masked or refused then).
fn copy_check(st: &State, judge: &JudgeCtx, j: &Judgement) -> Result<(), Refusal> {
    if j.decision.masks.iter().all(|m| m.columns.is_empty()) {
        return Ok(());
    }
    let statements = &j.classification.statements;
    if statements.iter().all(|s| s.stored.is_empty()) {
        return Ok(());
    }
    let c = &judge.catalog;
    let data: Arc<dyn crate::masking::plan::Resolve + Send + Sync> = if c.in_session() {
        // What the session's catalog has not been asked about may be PostgreSQL's own.
        Arc::new(crate::masking::plan::Either(c.cached(), no_catalog(st, j)))
    } else {
        c.cached()
    };
    // Definitions changed earlier in the session's transaction, or earlier in this
    // message, are not in the catalog yet.
    let mut redefined = st.redefined.clone();
    for s in statements {
        crate::masking::copies::check(&j.decision.masks, &s.stored, &*data, &redefined)?;
        redefined.add(Redefined::by(s));
    }
    Ok(())
}

/// What [`copy_check`] says of a message: `Ok(None)` it may run, `Ok(Some(..))` the
/// refusal of a copy of a masked column, `Err(names)` the catalog has not cached what
/// the check needs and is to be asked about these names first (unless `looked_up`: it
/// has been, and what it still cannot confirm is refused).
fn copy_verdict(
    st: &State,
    judge: &JudgeCtx,
    j: &Judgement,
    looked_up: bool,
) -> Result<Option<Denial>, Vec<String>> {
    match copy_check(st, judge, j) {
        Ok(()) => Ok(None),
        Err(
            Refusal::CopyUnverified { .. }
            | Refusal::CopyUnplaced { .. }
            | Refusal::CopyUnverifiedPlace { .. },
        ) if !looked_up => Err(j
            .classification
            .statements
            .iter()
            .flat_map(|s| crate::masking::copies::names(&s.stored))
            .collect()),
        Err(r) => Ok(Some(denial_of_refusal(&r))),
    }
}

/// The client's error for a mask that cannot be honoured.
fn denial_of_refusal(r: &Refusal) -> Denial {
    Denial {
        rule: r.rule().to_owned(),
        message: r.to_string(),
    }
}

/// Remembers the relations a message may redefine, which the catalog does not show yet,
/// and, unless it is `refused`, its `LISTEN`s with the masks they were judged under
/// (policy `generation`).
fn note_effects(st: &mut State, j: &Judgement, sql: &Arc<str>, generation: u64, refused: bool) {
    for s in &j.classification.statements {
        st.redefined.add(Redefined::by(s));
    }
    if !refused && shadows_catalog(j) {
        st.system_names = false;
    }
    if !refused
        && j.classification
            .statements
            .iter()
            .any(|s| s.kinds.contains(&Kind::Listen))
    {
        st.listens.add(sql, &j.decision.masks, generation);
    }
}

/// What judging a prepared statement again says ([`rejudge`]).
enum Rejudged {
    /// The policies are those it was prepared under: the decision made then holds.
    Same,
    /// Judged again (one decision event); it may run under this.
    Fresh(Prepared),
    /// It may not run now: the judgement and the refusal.
    Refused(Arc<Judgement>, Denial),
    /// Its copy check needs the catalog asked about these names first; then judge again.
    Lookup(Vec<String>),
}

/// The decision a prepared statement runs under. While the policies are those it was
/// prepared under, [`Rejudged::Same`]. After a reload it is judged again, so that a
/// tightened policy also stops statements prepared before it and a new mask covers their
/// results. A statement that now needs approval is refused (the client prepares it again,
/// and that is held for approval), unless it has just been `approved` (held under the old
/// policies, answered under the new). `looked_up`: as for [`copy_verdict`].
fn rejudge(
    st: &State,
    judge: &JudgeCtx,
    p: &Prepared,
    approved: bool,
    looked_up: bool,
) -> Rejudged {
    let generation = judge.generation();
    if generation == p.generation {
        return Rejudged::Same;
    }
    let j = judge.judge(&p.sql, st.lex);
    let refused = match j.decision.verdict {
        Verdict::Deny => Some(denial_of(&j)),
        Verdict::RequireApproval if !approved => Some(Denial {
            rule: j.decision.rule.clone(),
            message: format!(
                "this statement was prepared before the policies changed and now needs \
                 approval (rule {}); prepare it again to ask for it",
                j.decision.rule
            ),
        }),
        _ => match copy_verdict(st, judge, &j, looked_up) {
            Err(names) => return Rejudged::Lookup(names),
            Ok(copy) => unmaskable(st, &j).or(copy),
        },
    };
    log_decision(judge, &p.sql, &j);
    match refused {
        Some(d) => Rejudged::Refused(j, d),
        None => Rejudged::Fresh(Prepared {
            judgement: j,
            generation,
            ..p.clone()
        }),
    }
}

/// Why a Bind cannot go to the server as it is ([`statement_to_bind`]).
enum Unbound {
    /// Refused: the portal that stands for it.
    Refused(Portal),
    /// The catalog must be asked about these names first.
    Lookup(Vec<String>),
}

/// The statement a Bind of `name` runs, judged again after a policy change (and kept so).
/// Refused: for a name never prepared through this session (refused at Parse, or made
/// where it was not judged) or a statement the current policies refuse.
fn statement_to_bind(
    st: &mut State,
    judge: &JudgeCtx,
    name: &str,
    looked_up: bool,
) -> Result<Prepared, Unbound> {
    let Some(p) = st.prepared.get(name).cloned() else {
        return Err(Unbound::Refused(Portal {
            sql: "".into(),
            judgement: None,
            refused: Some(never_prepared(name)),
            sent: None,
        }));
    };
    match rejudge(st, judge, &p, false, looked_up) {
        Rejudged::Same => Ok(p),
        Rejudged::Fresh(fresh) => {
            st.prepared.insert(name.to_owned(), fresh.clone());
            Ok(fresh)
        }
        Rejudged::Refused(j, denial) => Err(Unbound::Refused(Portal {
            sql: p.sql,
            judgement: Some(j),
            refused: Some(denial),
            sent: None,
        })),
        Rejudged::Lookup(names) => Err(Unbound::Lookup(names)),
    }
}

/// Rule reported for a PREPARE or Parse of a name already in use, and for an EXECUTE or
/// Bind of a name this session never prepared.
pub const PREPARED_NAME_RULE: &str = "prepared-statement-name";

/// What a query's `PREPARE`s and `EXECUTE`s name must be for its results to be masked
/// by what the named statements were judged: a `PREPARE` must not take a name in use
/// (the server keeps the statement it has; the judgement would be the new one's), and an
/// `EXECUTE` must run a statement prepared through this session (else what it runs was
/// never judged). The refusal when one is not.
fn check_prepared_names(st: &State, j: &Judgement) -> Option<Denial> {
    let mut made: Vec<&str> = Vec::new();
    if declares_reserved(j) {
        return Some(reserved_name(inband::NAME));
    }
    for s in &j.classification.statements {
        match (s.kind, s.prepared.as_deref()) {
            (Kind::Prepare, Some(inband::NAME)) => return Some(reserved_name(inband::NAME)),
            (Kind::Prepare, Some(name)) => {
                if st.prepared.contains_key(name) || made.contains(&name) {
                    return Some(name_in_use(name));
                }
                made.push(name);
            }
            (Kind::Execute, Some(name))
                if !st.prepared.contains_key(name) && !made.contains(&name) =>
            {
                return Some(never_prepared(name));
            }
            _ => {}
        }
    }
    None
}

/// Whether a `DECLARE` in `j` opens a cursor under [`inband::NAME`].
fn declares_reserved(j: &Judgement) -> bool {
    j.classification
        .statements
        .iter()
        .any(|s| s.cursors.iter().any(|c| c == inband::NAME))
}

fn name_in_use(name: &str) -> Denial {
    Denial {
        rule: PREPARED_NAME_RULE.into(),
        message: format!(
            "a prepared statement named {name:?} already exists in this session; \
             DEALLOCATE (or Close) it before preparing another under that name"
        ),
    }
}

/// The statement and portal name the catalog lookups on a session use ([`inband::NAME`]):
/// a client's statement, portal or cursor (`DECLARE`) of that name would be closed by one.
fn reserved_name(name: &str) -> Denial {
    Denial {
        rule: PREPARED_NAME_RULE.into(),
        message: format!(
            "the name {name:?} is reserved for Portcullis's own catalog lookups on the \
             session; prepare or bind under another name"
        ),
    }
}

fn never_prepared(name: &str) -> Denial {
    Denial {
        rule: PREPARED_NAME_RULE.into(),
        message: format!(
            "the prepared statement {name:?} was not prepared through Portcullis in this \
             session, so what it runs was never judged; prepare it again"
        ),
    }
}

/// Judges again, after a policy change, the prepared statements a query `EXECUTE`s,
/// keeping the fresh decisions: `Ok(Some(..))` the refusal when one may no longer run,
/// `Err(names)` the catalog is to be asked about these first.
fn rejudge_executes(
    st: &mut State,
    judge: &JudgeCtx,
    j: &Judgement,
    looked_up: bool,
) -> Result<Option<Denial>, Vec<String>> {
    for s in &j.classification.statements {
        let crate::policy::sql::lineage::Shape::Execute(name) = &s.shape else {
            continue;
        };
        let Some(p) = st.prepared.get(name) else {
            continue;
        };
        match rejudge(st, judge, p, false, looked_up) {
            Rejudged::Same => {}
            Rejudged::Fresh(fresh) => {
                st.prepared.insert(name.clone(), fresh);
            }
            Rejudged::Refused(_, d) => return Ok(Some(d)),
            Rejudged::Lookup(names) => return Err(names),
        }
    }
    Ok(None)
}

/// A statement to record before the message carrying it is forwarded.
struct Stmt {
    /// `query`, `parse`, `execute` or `function_call`.
    via: &'static str,
    sql: Arc<str>,
    judgement: Option<Arc<Judgement>>,
    /// Why it is refused, when it is.
    refused: Option<Denial>,
    /// The prepared statement or portal.
    name: Option<String>,
}

impl Stmt {
    /// The decision event of a statement judged from its text (a Query or a Parse; an
    /// Execute runs what its Parse decided and was logged then).
    fn log(&self, judge: &JudgeCtx) {
        if let ("query" | "parse", Some(j)) = (self.via, &self.judgement) {
            log_decision(judge, &self.sql, j);
        }
    }

    fn record(&self, n: u64, session: i64, redact: bool) -> crate::store::Append {
        // Serialized straight from borrowed fields, keys in alphabetical order (the order
        // the records always had).
        #[derive(serde::Serialize)]
        struct Body<'a> {
            kinds: &'a [String],
            masks: Vec<&'a str>,
            n: u64,
            name: Option<&'a str>,
            redacted: bool,
            refused: Option<&'a str>,
            rule: &'a str,
            sql: &'a str,
            verdict: &'a str,
            via: &'a str,
        }
        let refused = self.refused.as_ref();
        let j = self.judgement.as_deref();
        let verdict = match j {
            Some(j) if refused.is_none() => j.decision.verdict.as_str(),
            _ => "deny",
        };
        let rule = match (refused, j) {
            (Some(d), _) => d.rule.as_str(),
            (None, Some(j)) => j.decision.rule.as_str(),
            (None, None) => "",
        };
        let redact = redact || j.is_some_and(|j| j.decision.redact_literals);
        let redacted_sql;
        let sql = if redact {
            redacted_sql = crate::store::redact::redact_literals(&self.sql);
            redacted_sql.as_str()
        } else {
            &self.sql
        };
        crate::store::Append {
            session,
            kind: "statement",
            body: crate::store::Json::of(&Body {
                kinds: j.map_or(&[], |j| j.kind_names.as_slice()),
                masks: j.map_or_else(Vec::new, |j| {
                    j.decision.masks.iter().map(|m| m.rule.as_str()).collect()
                }),
                n,
                name: self.name.as_deref(),
                redacted: redact,
                refused: refused.map(|d| d.message.as_str()),
                rule,
                sql,
                verdict,
                via: self.via,
            }),
            at_us: crate::store::now_us(),
        }
    }
}

/// What to do with one client message.
enum Plan {
    Forward(Frame, Option<Expect>, Option<Stmt>),
    /// Several messages: the client's and ones the engine adds.
    Inject(Vec<(Frame, Expect)>),
    /// Hold for approval, then forward or refuse.
    Hold {
        frame: Frame,
        stmt: Stmt,
        judgement: Arc<Judgement>,
        /// The policy generation it was judged under.
        generation: u64,
        kind: HeldKind,
    },
    Close,
    /// The catalog must be asked about these names before the message can be judged;
    /// then it is planned again.
    Lookup(Frame, Vec<String>),
}

#[derive(Clone)]
enum HeldKind {
    Query,
    Parse(String),
}

/// Judges one client message (no I/O; the lock is held briefly). `looked_up`: the
/// catalog has been asked what a [`Plan::Lookup`] wanted (it is not asked twice).
fn plan(
    state: &Mutex<State>,
    judge: &JudgeCtx,
    f: Frame,
    looked_up: bool,
) -> Result<Plan, PgError> {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let cp = PgError::ClientProtocol;
    Ok(match f.tag {
        fe::QUERY => {
            let sql: Arc<str> = messages::query_text(&f.body).map_err(cp)?.into();
            let generation = judge.generation();
            let j = judge.judge(&sql, st.lex);
            if !looked_up && let Some(names) = masking_names(&st, judge, &j, None) {
                return Ok(Plan::Lookup(f, names));
            }
            let refusal = match j.decision.verdict {
                Verdict::Deny => Some(denial_of(&j)),
                _ => {
                    let copy = match copy_verdict(&st, judge, &j, looked_up) {
                        Ok(copy) => copy,
                        Err(names) => return Ok(Plan::Lookup(f, names)),
                    };
                    let names = check_prepared_names(&st, &j);
                    // Judged again even when the names are refused: fresh decisions are
                    // kept either way.
                    let executes = match rejudge_executes(&mut st, judge, &j, looked_up) {
                        Ok(d) => d,
                        Err(names) => return Ok(Plan::Lookup(f, names)),
                    };
                    names.or(executes).or_else(|| unmaskable(&st, &j)).or(copy)
                }
            };
            note_effects(&mut st, &j, &sql, generation, refusal.is_some());
            let stmt = |refused: Option<Denial>| Stmt {
                via: "query",
                sql: sql.clone(),
                judgement: Some(j.clone()),
                refused,
                name: None,
            };
            match (j.decision.verdict, refusal) {
                (_, Some(d)) => Plan::Forward(
                    messages::query(DENIED_SQL),
                    Some(Expect::Query {
                        denied: Some(d.clone()),
                        ctx: None,
                        sql: None,
                    }),
                    Some(stmt(Some(d))),
                ),
                (Verdict::RequireApproval, None) => Plan::Hold {
                    frame: f,
                    stmt: stmt(None),
                    judgement: j.clone(),
                    generation,
                    kind: HeldKind::Query,
                },
                (_, None) => {
                    remember_sql_prepares(&mut st, &j, &sql, generation);
                    Plan::Forward(
                        f,
                        Some(Expect::Query {
                            denied: None,
                            ctx: Some(j.clone()),
                            sql: Some(sql.clone()),
                        }),
                        Some(stmt(None)),
                    )
                }
            }
        }
        fe::PARSE => {
            let p = Parse::decode(&f.body).map_err(cp)?;
            let generation = judge.generation();
            let j = judge.judge(&p.sql, st.lex);
            if !looked_up && let Some(names) = masking_names(&st, judge, &j, Some(0)) {
                return Ok(Plan::Lookup(f, names));
            }
            // The unnamed statement is replaced by every Parse; a named one is not: the
            // server refuses the name while it exists.
            let in_use = !p.name.is_empty() && st.prepared.contains_key(&p.name);
            let refusal = match j.decision.verdict {
                _ if p.name == inband::NAME => Some(reserved_name(&p.name)),
                _ if declares_reserved(&j) => Some(reserved_name(inband::NAME)),
                _ if in_use => Some(name_in_use(&p.name)),
                Verdict::Deny => Some(denial_of(&j)),
                _ => {
                    let copy = match copy_verdict(&st, judge, &j, looked_up) {
                        Ok(copy) => copy,
                        Err(names) => return Ok(Plan::Lookup(f, names)),
                    };
                    unmaskable(&st, &j).or(copy)
                }
            };
            let sql: Arc<str> = p.sql.as_str().into();
            note_effects(&mut st, &j, &sql, generation, refusal.is_some());
            let stmt = |refused: Option<Denial>| Stmt {
                via: "parse",
                sql: sql.clone(),
                judgement: Some(j.clone()),
                refused,
                name: Some(p.name.clone()),
            };
            match (j.decision.verdict, refusal) {
                (_, Some(denial)) => {
                    // The server drops the unnamed statement before it parses the
                    // substitute; a named one in use stays.
                    if !in_use {
                        st.prepared.remove(&p.name);
                    }
                    let stmt = stmt(Some(denial.clone()));
                    let sub = Parse {
                        name: p.name,
                        sql: DENIED_SQL.into(),
                        param_types: Vec::new(),
                    };
                    Plan::Forward(
                        sub.encode(),
                        Some(Expect::Parse {
                            denied: Some(denial),
                            name: None,
                        }),
                        Some(stmt),
                    )
                }
                (Verdict::RequireApproval, None) => Plan::Hold {
                    frame: f,
                    stmt: stmt(None),
                    judgement: j.clone(),
                    generation,
                    kind: HeldKind::Parse(p.name),
                },
                (_, None) => {
                    let stmt = stmt(None);
                    let name = Some(p.name.clone());
                    st.prepared
                        .insert(p.name, Prepared::new(sql, j.clone(), generation, 0));
                    Plan::Forward(f, Some(Expect::Parse { denied: None, name }), Some(stmt))
                }
            }
        }
        fe::BIND => {
            let b = messages::Bind::decode(&f.body).map_err(cp)?;
            let bound = if b.portal == inband::NAME {
                Err(Unbound::Refused(Portal {
                    sql: "".into(),
                    judgement: None,
                    refused: Some(reserved_name(&b.portal)),
                    sent: None,
                }))
            } else {
                statement_to_bind(&mut st, judge, &b.statement, looked_up)
            };
            let prepared = match bound {
                Ok(p) => p,
                Err(Unbound::Lookup(names)) => return Ok(Plan::Lookup(f, names)),
                Err(Unbound::Refused(refused)) => {
                    // The server fails a Bind it cannot read, before it touches any
                    // portal; the client gets the denial, its Execute is skipped.
                    let bind = Expect::Bind {
                        portal: b.portal.clone(),
                        ctx: None,
                        at: 0,
                        denied: refused.refused.clone(),
                    };
                    st.portals.insert(b.portal.clone(), refused);
                    return Ok(Plan::Forward(
                        messages::unreadable_bind(&b.portal, &b.statement),
                        Some(bind),
                        None,
                    ));
                }
            };
            let (j, at) = (prepared.judgement, prepared.at);
            if !looked_up && let Some(names) = masking_names(&st, judge, &j, Some(at)) {
                return Ok(Plan::Lookup(f, names));
            }
            let masked = results::applies(&j, at, &|n| st.prepared_ctx(n)).is_some();
            // The portal's results are masked, and the session's results named types of
            // the database's own not asked about yet (the client has described this
            // statement before it chose binary formats for its results): asked now, as
            // nothing can be asked while the results stream.
            if !looked_up
                && masked
                && judge.catalog.in_session()
                && !judge.catalog.unlearned_types().is_empty()
            {
                return Ok(Plan::Lookup(f, Vec::new()));
            }
            let sent = masked.then(|| sent_text(&prepared.sql, &f.body));
            st.portals.insert(
                b.portal.clone(),
                Portal {
                    sql: prepared.sql,
                    judgement: Some(j.clone()),
                    refused: None,
                    sent,
                },
            );
            let bind = Expect::Bind {
                portal: b.portal.clone(),
                ctx: Some(j),
                at,
                denied: None,
            };
            if masked {
                // The portal's own description, with the result formats Bind chose, is
                // what masking needs; the client may not ask for it, so the engine does.
                Plan::Inject(vec![
                    (f, bind),
                    (
                        messages::describe(b'P', &b.portal),
                        Expect::DescribePortal {
                            name: b.portal,
                            swallow: true,
                        },
                    ),
                ])
            } else {
                Plan::Forward(f, Some(bind), None)
            }
        }
        fe::DESCRIBE => {
            let t = messages::Target::decode(&f.body, "Describe").map_err(cp)?;
            let e = if t.kind == b'S' {
                Expect::DescribeStatement {
                    name: t.name,
                    swallow: false,
                }
            } else {
                Expect::DescribePortal {
                    name: t.name,
                    swallow: false,
                }
            };
            Plan::Forward(f, Some(e), None)
        }
        fe::EXECUTE => {
            let portal = messages::execute_portal(&f.body).map_err(cp)?;
            // Each execution runs the statement again: recorded each time, with the
            // decision it runs under (an unknown portal's Execute fails at the server).
            let p = st.portals.get(&portal);
            let stmt = Stmt {
                via: "execute",
                sql: p.map_or_else(|| "".into(), |p| p.sql.clone()),
                judgement: p.and_then(|p| p.judgement.clone()),
                refused: p.and_then(|p| p.refused.clone()),
                name: Some(portal.clone()),
            };
            Plan::Forward(f, Some(Expect::Execute { portal }), Some(stmt))
        }
        fe::CLOSE => {
            let t = messages::Target::decode(&f.body, "Close").map_err(cp)?;
            if t.kind == b'S' {
                st.prepared.remove(&t.name);
            } else {
                st.portals.remove(&t.name);
            }
            Plan::Forward(f, Some(Expect::Close), None)
        }
        fe::SYNC => Plan::Forward(f, Some(Expect::Sync), None),
        fe::FUNCTION_CALL => {
            tracing::info!(
                target: "portcullis::audit",
                verdict = "deny",
                rule = FUNCTION_CALL_RULE,
                agent.name = %judge.subject.agent,
                target.name = %judge.target,
                "decision"
            );
            let d = Denial {
                rule: FUNCTION_CALL_RULE.into(),
                message: "the function-call protocol message is not allowed through \
                          Portcullis; call the function from SQL"
                    .into(),
            };
            Plan::Forward(
                messages::query(DENIED_SQL),
                Some(Expect::FunctionCall {
                    denied: Some(d.clone()),
                }),
                Some(Stmt {
                    via: "function_call",
                    sql: "".into(),
                    judgement: None,
                    refused: Some(d),
                    name: None,
                }),
            )
        }
        fe::TERMINATE => Plan::Close,
        fe::COPY_DONE | fe::COPY_FAIL => Plan::Forward(f, Some(Expect::CopyEnd), None),
        fe::FLUSH | fe::COPY_DATA => Plan::Forward(f, None, None),
        // Anything else is not forwarded unexamined: a password message after
        // authentication, or a type this engine does not know.
        other => {
            return Err(PgError::ClientProtocol(
                super::codec::FrameError::Malformed {
                    what: "message",
                    why: format!("unexpected message type {:?}", other as char),
                },
            ));
        }
    })
}

/// SQL-level PREPARE: remember what the name was judged (and the text it came in, to
/// judge it again after a policy change), for EXECUTE and Bind; DEALLOCATE forgets the
/// name, DEALLOCATE ALL and DISCARD ALL every name (as the server does).
fn remember_sql_prepares(st: &mut State, j: &Arc<Judgement>, sql: &Arc<str>, generation: u64) {
    for (at, s) in j.classification.statements.iter().enumerate() {
        if s.drops_all_prepared {
            st.prepared.clear();
        }
        match (s.kind, &s.prepared) {
            (Kind::Prepare, Some(name)) => {
                st.prepared.insert(
                    name.clone(),
                    Prepared::new(sql.clone(), j.clone(), generation, at),
                );
            }
            (Kind::Deallocate, Some(name)) => {
                st.prepared.remove(name);
            }
            _ => {}
        }
    }
}

/// One event per decision (`portcullis::audit`), as operators expect in the journal.
fn log_decision(judge: &JudgeCtx, sql: &str, j: &Judgement) {
    let d = &j.decision;
    judge.statements[match d.verdict {
        Verdict::Allow => 0,
        Verdict::Mask => 1,
        Verdict::RequireApproval => 2,
        Verdict::Deny => 3,
    }]
    .inc();
    crate::metrics::get()
        .rule_decisions
        .with_label_values(&[d.rule.as_str(), d.verdict.as_str()])
        .inc();
    if !tracing::enabled!(target: "portcullis::audit", tracing::Level::INFO) {
        return;
    }
    tracing::info!(
        target: "portcullis::audit",
        verdict = d.verdict.as_str(),
        rule = %d.rule,
        agent.name = %judge.subject.agent,
        target.name = %judge.target,
        kinds = %j.kind_names.join(","),
        statement = %judge.shown(sql, d),
        "decision"
    );
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[allow(clippy::too_many_arguments)]
async fn client_to_server<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    client: Reader<R>,
    server: WriteHalf<W>,
    client_w: Arc<tokio::sync::Mutex<WriteHalf<Stream>>>,
    state: Arc<Mutex<State>>,
    judge: &JudgeCtx,
    shared: &PgShared,
    ctx: &ConnContext,
    traffic: &Traffic,
) -> Result<End, PgError> {
    let r = client_to_server_inner(
        client,
        server,
        client_w.clone(),
        state,
        judge,
        shared,
        ctx,
        traffic,
    )
    .await;
    if let Err(e @ (PgError::ClientProtocol(_) | PgError::ClientStalled(_))) = &r {
        let mut w = client_w.lock().await;
        startup::refuse(&mut *w, &e.to_string()).await;
    }
    if let Err(PgError::Store(why)) = &r {
        tell_fatal(&mut *client_w.lock().await, "58000", why).await;
    }
    r
}

#[allow(clippy::too_many_arguments)]
async fn client_to_server_inner<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut client: Reader<R>,
    mut server: WriteHalf<W>,
    client_w: Arc<tokio::sync::Mutex<WriteHalf<Stream>>>,
    state: Arc<Mutex<State>>,
    judge: &JudgeCtx,
    shared: &PgShared,
    ctx: &ConnContext,
    traffic: &Traffic,
) -> Result<End, PgError> {
    // Where the client's stream stands: whether the engine may put a catalog lookup of its
    // own before the next message ([`inband`]).
    let mut gap = inband::Gap::Between;
    loop {
        let mut plans = Vec::new();
        let mut hold = None;
        let mut close = false;
        let arrived = std::time::Instant::now();
        while let Some(f) = client.try_frame()? {
            if let Some(deadline) = judge.token_deadline
                && matches!(f.tag, fe::QUERY | fe::PARSE | fe::FUNCTION_CALL)
                && crate::store::now_us() / 1_000_000 >= deadline
            {
                let why = format!(
                    "the session's OIDC token expired at {}; reconnect with a fresh token",
                    crate::oidc::claims::rfc3339(deadline)
                );
                tracing::warn!(conn.id = ctx.id, agent.name = %ctx.agent.name, "session ended: its OIDC token expired");
                tell_fatal(&mut *client_w.lock().await, "28000", &why).await;
                return Ok(End::TokenExpired);
            }
            state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .received_at
                .get_or_insert(arrived);
            let tag = f.tag;
            let mut planned = plan(&state, judge, f, false)?;
            if let Plan::Lookup(f, names) = planned {
                let c = &judge.catalog;
                if !c.in_session() {
                    // Failures are logged there; the plan then refuses what it cannot
                    // verify.
                    let _ = c.lookup(shared, &[], &names).await;
                } else if !matches!(gap, inband::Gap::Inside { .. }) {
                    // Asked on this connection: after what came before it has been sent,
                    // and only where the client's stream leaves room.
                    send_plans(&mut plans, &mut server, &state, judge, shared, ctx, traffic)
                        .await?;
                    ask_in_session(&mut server, &state, c, &names, gap, ctx, traffic).await?;
                }
                planned = plan(&state, judge, f, true)?;
            }
            gap = gap.after(tag);
            match planned {
                p @ Plan::Hold { .. } => {
                    hold = Some(p);
                    break;
                }
                Plan::Close => {
                    close = true;
                    break;
                }
                p => plans.push(p),
            }
        }
        if close {
            plans.push(Plan::Close);
        }
        send_plans(&mut plans, &mut server, &state, judge, shared, ctx, traffic).await?;
        if close {
            let _ = server.shutdown().await;
            return Ok(End::Closed);
        }
        if let Some(Plan::Hold {
            frame,
            stmt,
            judgement,
            generation,
            kind,
        }) = hold
        {
            stmt.log(judge);
            // On record before anyone is asked; refused if it cannot be.
            let mut held = vec![Plan::Forward(frame, None, Some(stmt))];
            record_statements(&mut held, &state, shared, ctx).await?;
            let Some(Plan::Forward(frame, refused, Some(stmt))) = held.pop() else {
                unreachable!("one plan in, one out");
            };
            if let Some(e) = refused {
                // The store refused: forward the substitute it made.
                flush_up(
                    &mut server,
                    &state,
                    frame.to_bytes().into(),
                    vec![e],
                    traffic,
                )
                .await?;
                continue;
            }
            let sql = stmt.sql.clone();
            let request = shared.approver.request(
                ApprovalRequest {
                    session: ctx.session,
                    agent: ctx.agent.name.clone(),
                    target: ctx.target.name.clone(),
                    uid: ctx.identity.uid,
                    statement: sql.to_string(),
                    decision: judgement.decision.clone(),
                },
                notifier(client_w.clone()),
            );
            tokio::pin!(request);
            // While it waits, a client that goes away withdraws the request (dropping the
            // future does); what it pipelines meanwhile is kept, up to a bound.
            let outcome = loop {
                let room = client.buffered() < HOLD_BUFFER;
                tokio::select! {
                    o = &mut request => break o,
                    more = client.fill(), if room => match more {
                        Ok(true) => {}
                        Ok(false) | Err(_) => {
                            let _ = server.shutdown().await;
                            return Ok(End::Closed);
                        }
                    },
                }
            };
            // The policies may have changed while it waited: an approved statement runs
            // under the current ones (their masks; their denial refuses it after all).
            let (judgement, generation, now_refused) = if outcome == ApprovalOutcome::Approved {
                let held = Prepared::new(sql.clone(), judgement.clone(), generation, 0);
                let again = |looked_up| {
                    let st = state.lock().unwrap_or_else(|e| e.into_inner());
                    rejudge(&st, judge, &held, true, looked_up)
                };
                let mut rejudged = again(false);
                if let Rejudged::Lookup(names) = &rejudged {
                    let _ = judge.catalog.lookup(shared, &[], names).await;
                    rejudged = again(true);
                }
                match rejudged {
                    Rejudged::Same => (judgement, generation, None),
                    Rejudged::Fresh(fresh) => (fresh.judgement, fresh.generation, None),
                    Rejudged::Refused(j, d) => (j, generation, Some(d)),
                    // Not after a lookup (what it cannot confirm is refused then).
                    Rejudged::Lookup(_) => {
                        let d = Denial {
                            rule: judgement.decision.rule.clone(),
                            message: "the catalog could not confirm what this statement \
                                      copies; it is refused"
                                .into(),
                        };
                        (judgement, generation, Some(d))
                    }
                }
            } else {
                (judgement, generation, None)
            };
            let refused = now_refused.is_some() || outcome != ApprovalOutcome::Approved;
            if let Some(d) = &now_refused {
                // On record as refused, beside its held record and the approval.
                let refusal = Stmt {
                    via: stmt.via,
                    sql: sql.clone(),
                    judgement: Some(judgement.clone()),
                    refused: Some(d.clone()),
                    name: stmt.name.clone(),
                };
                let record = state.lock().unwrap_or_else(|e| e.into_inner()).record(
                    &refusal,
                    ctx.session,
                    shared.store.config().redact_literals,
                );
                if let Err(e) = shared.store.append_durable(vec![record]).await {
                    tracing::error!(
                        target: "portcullis::audit",
                        error = %e,
                        session = ctx.session,
                        "the refusal of an approved statement could not be recorded"
                    );
                }
            }
            let (frame, expect) = match (&outcome, &kind) {
                (ApprovalOutcome::Approved, kind) if let Some(d) = now_refused => {
                    let d = Denial {
                        message: format!(
                            "{} (approved, but the policies changed while it waited)",
                            d.message
                        ),
                        ..d
                    };
                    substitute(kind, d)
                }
                (ApprovalOutcome::Approved, HeldKind::Query) => {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    remember_sql_prepares(&mut st, &judgement, &sql, generation);
                    (
                        frame,
                        Expect::Query {
                            denied: None,
                            ctx: Some(judgement.clone()),
                            sql: Some(sql.clone()),
                        },
                    )
                }
                (ApprovalOutcome::Approved, HeldKind::Parse(name)) => {
                    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                    st.prepared.insert(
                        name.clone(),
                        Prepared::new(sql.clone(), judgement.clone(), generation, 0),
                    );
                    (
                        frame,
                        Expect::Parse {
                            denied: None,
                            name: Some(name.clone()),
                        },
                    )
                }
                (refused, kind) => {
                    let why = match refused {
                        ApprovalOutcome::Denied { reason } => {
                            format!("{} (denied: {reason})", denial_of(&judgement).message)
                        }
                        _ => format!("{} (no decision in time)", denial_of(&judgement).message),
                    };
                    let d = Denial {
                        rule: judgement.decision.rule.clone(),
                        message: why,
                    };
                    substitute(kind, d)
                }
            };
            tracing::info!(
                target: "portcullis::audit",
                verdict = if refused { "refused" } else { "approved" },
                rule = %judgement.decision.rule,
                agent.name = %judge.subject.agent,
                target.name = %judge.target,
                statement = %judge.shown(&sql, &judgement.decision),
                "decision"
            );
            flush_up(
                &mut server,
                &state,
                frame.to_bytes().into(),
                vec![expect],
                traffic,
            )
            .await?;
            continue;
        }
        if !client.fill().await? {
            let _ = server.shutdown().await;
            return Ok(End::Closed);
        }
    }
}

/// Records the planned messages, then forwards them (and the session's end, for a
/// [`Plan::Close`] at the end) in one write; their decisions are logged after they left.
async fn send_plans<W: AsyncWrite + Unpin>(
    plans: &mut Vec<Plan>,
    server: &mut WriteHalf<W>,
    state: &Mutex<State>,
    judge: &JudgeCtx,
    shared: &PgShared,
    ctx: &ConnContext,
    traffic: &Traffic,
) -> Result<(), PgError> {
    if plans.is_empty() {
        return Ok(());
    }
    record_statements(plans, state, shared, ctx).await?;
    let mut out = BytesMut::new();
    let mut expects = Vec::new();
    let mut judged = Vec::new();
    for p in plans.drain(..) {
        match p {
            Plan::Forward(f, e, stmt) => {
                f.encode(&mut out);
                expects.extend(e);
                judged.extend(stmt);
            }
            Plan::Inject(v) => {
                for (f, e) in v {
                    f.encode(&mut out);
                    expects.push(e);
                }
            }
            Plan::Close => Frame::new(fe::TERMINATE, Bytes::new()).encode(&mut out),
            Plan::Hold { .. } | Plan::Lookup(..) => unreachable!("not collected"),
        }
    }
    let sent = flush_up(server, state, out, expects, traffic).await;
    // Decision events after the statements left: logging is off their latency.
    for s in &judged {
        s.log(judge);
    }
    sent
}

/// Asks the session's own catalog about `names` on the session's connection ([`inband`]),
/// views over views included, and about the database's own types its results have named
/// ([`Catalog::unlearned_types`]), and caches the answers, where the client's stream leaves
/// room (`gap`). Waits first for every answer to what was forwarded before (the
/// transaction status must be known; at most
/// [`catalog::TIMEOUT`], as a client in the middle of a COPY would never get there).
/// A lookup that fails leaves the names unknown: masking then treats them as undecidable
/// (and values of types not known as unreadable).
async fn ask_in_session<W: AsyncWrite + Unpin>(
    server: &mut WriteHalf<W>,
    state: &Mutex<State>,
    catalog: &Catalog,
    names: &[String],
    gap: inband::Gap,
    ctx: &ConnContext,
    traffic: &Traffic,
) -> Result<(), PgError> {
    let mut want = catalog.unknown_names(names);
    let mut types = catalog.unlearned_types();
    if want.is_empty() && types.is_empty() {
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + catalog::TIMEOUT;
    let idle = state.lock().unwrap_or_else(|e| e.into_inner()).idle.clone();
    let status = loop {
        let notified = idle.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let st = state.lock().unwrap_or_else(|e| e.into_inner());
            if st.tracker.is_idle() {
                // Whatever is sent while the server skips to the client's Sync is lost.
                if st.tracker.is_skipping() {
                    return Ok(());
                }
                break st.status;
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            tracing::debug!(
                conn.id = ctx.id,
                "catalog lookup skipped: the session stayed busy"
            );
            return Ok(());
        }
    };
    if !gap.open(status) {
        return Ok(());
    }
    let in_block = status == b'T';
    // Relations first, then types, a round each until nothing is left to ask.
    for _ in 0..2 * catalog::MAX_ROUNDS {
        let sql = if !want.is_empty() {
            catalog::lookup_sql(&[], &want)
        } else if !types.is_empty() {
            catalog::types_sql(&types)
        } else {
            return Ok(());
        };
        let reply = exchange(server, state, inband::lookup(&sql, in_block), traffic).await?;
        if let Some(error) = reply.error {
            tracing::warn!(
                conn.id = ctx.id,
                error = %error,
                "catalog lookup on the session's connection failed; its names stay undecidable"
            );
            if in_block {
                let undone = exchange(server, state, inband::undo(), traffic).await?;
                if undone.status != b'T' {
                    tracing::error!(
                        conn.id = ctx.id,
                        error = undone.error.as_deref().unwrap_or(""),
                        "a failed catalog lookup could not be rolled back to its savepoint"
                    );
                }
            }
            return Ok(());
        }
        if !want.is_empty() {
            want = catalog.absorb(reply.rows, &want);
        } else {
            types = catalog.absorb_types(reply.rows, &types);
        }
    }
    Ok(())
}

/// Sends one of the engine's catalog batches and waits for its whole answer (the server
/// answers in order: whatever the client sends meanwhile waits behind it there too).
async fn exchange<W: AsyncWrite + Unpin>(
    server: &mut WriteHalf<W>,
    state: &Mutex<State>,
    batch: BytesMut,
    traffic: &Traffic,
) -> Result<inband::Reply, PgError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        st.tracker.push(Expect::Catalog);
        st.lookup = Some(inband::Waiting {
            answer: inband::Answer::default(),
            reply: tx,
        });
    }
    write_up(server, &batch, traffic).await?;
    // Dropped only when the server side of the session ended, which ends the session.
    rx.await
        .map_err(|_| PgError::ServerIo(std::io::ErrorKind::ConnectionAborted.into()))
}

/// Most bytes a client may pipeline while a statement of its waits for approval.
const HOLD_BUFFER: usize = 1 << 20;

/// The refusal that replaces a held or unrecordable statement.
fn substitute(kind: &HeldKind, d: Denial) -> (Frame, Expect) {
    match kind {
        HeldKind::Query => (
            messages::query(DENIED_SQL),
            Expect::Query {
                denied: Some(d),
                ctx: None,
                sql: None,
            },
        ),
        HeldKind::Parse(name) => (
            Parse {
                name: name.clone(),
                sql: DENIED_SQL.into(),
                param_types: Vec::new(),
            }
            .encode(),
            Expect::Parse {
                denied: Some(d),
                name: None,
            },
        ),
    }
}

/// Records the statements of `plans` before any of them is forwarded (one durable group).
/// If the store cannot take them, each is replaced by a refusal (an Execute, which cannot
/// be refused in place, ends the session).
async fn record_statements(
    plans: &mut [Plan],
    state: &Mutex<State>,
    shared: &PgShared,
    ctx: &ConnContext,
) -> Result<(), PgError> {
    let redact = shared.store.config().redact_literals;
    let records: Vec<crate::store::Append> = {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        plans
            .iter()
            .filter_map(|p| match p {
                Plan::Forward(_, _, Some(stmt)) => Some(st.record(stmt, ctx.session, redact)),
                _ => None,
            })
            .collect()
    };
    if records.is_empty() {
        return Ok(());
    }
    let Err(e) = shared.store.append_durable(records).await else {
        return Ok(());
    };
    tracing::error!(
        target: "portcullis::audit",
        error = %e,
        session = ctx.session,
        agent.name = %ctx.agent.name,
        "statements refused: the audit store cannot record them"
    );
    let d = Denial {
        rule: STORE_RULE.into(),
        message: format!("the audit store cannot record this statement ({e}); it was not sent"),
    };
    for p in plans.iter_mut() {
        let Plan::Forward(frame, expect, Some(stmt)) = p else {
            continue;
        };
        shared
            .store
            .stats
            .refused_statements
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let kind = match stmt.via {
            "query" | "function_call" => HeldKind::Query,
            "parse" => HeldKind::Parse(stmt.name.clone().unwrap_or_default()),
            _ => return Err(PgError::Store(d.message)),
        };
        let (f, e) = match (stmt.via, expect.take()) {
            // Already refused: keep its own answer.
            (_, Some(e @ Expect::FunctionCall { .. })) => (frame.clone(), e),
            _ => substitute(&kind, d.clone()),
        };
        *frame = f;
        *expect = Some(e);
    }
    Ok(())
}

fn notifier(w: Arc<tokio::sync::Mutex<WriteHalf<Stream>>>) -> super::approval::Notify {
    Box::new(move |text: String| {
        tokio::spawn(async move {
            let n = Notice {
                severity: "NOTICE",
                code: "00000",
                message: text,
                detail: None,
                hint: None,
            }
            .notice();
            let mut w = w.lock().await;
            let _ = w.write_all(&n.to_bytes()).await;
        });
    })
}

/// Registers what the server will answer, then writes. Expectations first: the answers
/// may arrive before `write_all` returns.
async fn flush_up<W: AsyncWrite + Unpin>(
    server: &mut WriteHalf<W>,
    state: &Mutex<State>,
    out: BytesMut,
    expects: Vec<Expect>,
    traffic: &Traffic,
) -> Result<(), PgError> {
    if out.is_empty() {
        return Ok(());
    }
    {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        for e in expects {
            st.tracker.push(e);
        }
        st.sent_at.get_or_insert_with(std::time::Instant::now);
    }
    write_up(server, &out, traffic).await
}

/// Writes to the server, counted as traffic to it.
async fn write_up<W: AsyncWrite + Unpin>(
    server: &mut WriteHalf<W>,
    out: &[u8],
    traffic: &Traffic,
) -> Result<(), PgError> {
    server.write_all(out).await.map_err(PgError::ServerIo)?;
    traffic
        .to_upstream
        .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

async fn server_to_client<R: AsyncRead + Unpin>(
    mut server: Reader<ReadHalf<R>>,
    client: Arc<tokio::sync::Mutex<WriteHalf<Stream>>>,
    state: Arc<Mutex<State>>,
    judge: &JudgeCtx,
    mut masking: ResultMasking,
    traffic: &Traffic,
    target: &str,
) -> Result<End, PgError> {
    // This session's latency histograms, looked up once.
    let m = crate::metrics::get();
    let statement_seconds = m.statement_seconds.with_label_values(&[target]);
    let upstream_seconds = m.upstream_seconds.with_label_values(&[target]);
    let prepared = |n: &str| {
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .prepared_ctx(n)
    };
    loop {
        let mut out = BytesMut::new();
        while let Some(f) = server.try_frame()? {
            let mut masked_sql = None;
            let mut notify = Notify::Pass;
            let (route, head) = {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                // The answer to the engine's own catalog lookup: kept, never relayed.
                if let Some(done) = st.tracker.on_catalog(f.tag) {
                    if let Some(w) = st.lookup.as_mut() {
                        w.answer.take(&f);
                    }
                    if done && let Some(w) = st.lookup.take() {
                        let _ = w.reply.send(w.answer.finish(&f.body));
                    }
                    continue;
                }
                if f.tag == be::PARAMETER_STATUS
                    && let Ok((k, v)) = messages::parameter_status(&f.body)
                {
                    note_parameter(&mut st.lex, &k, &v);
                }
                if f.tag == be::ROW_DESCRIPTION
                    && judge.catalog.in_session()
                    && let Ok(fields) = messages::row_description(&f.body)
                {
                    judge.catalog.saw_types(fields.iter().map(|f| f.type_oid));
                }
                let head = st.tracker.head_query_ctx().cloned();
                masking.system_names = st.system_names;
                // Errors and notices of a masked statement may quote what it masks.
                if matches!(f.tag, be::ERROR_RESPONSE | be::NOTICE_RESPONSE) {
                    masked_sql = masked_statement_sql(&st, &masking);
                }
                settle_prepared(&mut st, &f);
                let route = st.tracker.on_server(f.tag)?;
                for name in st.tracker.take_unmade() {
                    forget_unmade(&mut st, &name);
                }
                if f.tag == be::NOTIFICATION {
                    let lex = st.lex;
                    // A LISTEN the policies now deny stops notifications; one they would
                    // hold for approval has had it.
                    let judged = |sql: &str| {
                        let j = judge.judge(sql, lex);
                        (j.decision.verdict != Verdict::Deny).then(|| j.decision.masks.clone())
                    };
                    notify = st.listens.notify(judge.generation(), &judged);
                }
                if f.tag == be::READY_FOR_QUERY {
                    st.status = messages::ready_status(&f.body).unwrap_or(b'E');
                    if st.tracker.is_idle() {
                        if st.status == b'I' {
                            st.redefined = Redefined::default();
                        }
                        st.idle.notify_one();
                    }
                }
                (route, head)
            };
            let handled = match route {
                Route::Deny(d) => {
                    denial_error(&d).encode(&mut out);
                    Ok(())
                }
                Route::Swallow(Owner::Portal(p)) => masking.on_described_portal(&f, &p).await,
                Route::Swallow(_) => Ok(()),
                Route::Bound(b) => {
                    masking.on_bound(b, &prepared);
                    f.encode(&mut out);
                    Ok(())
                }
                Route::Result(owner) => {
                    masking
                        .on_result(f, &owner, head.as_ref(), &prepared, &mut out)
                        .await
                }
                Route::Ready(_) => {
                    let (received, sent) = {
                        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                        (st.received_at.take(), st.sent_at.take())
                    };
                    if let Some(t) = received {
                        statement_seconds.observe(t.elapsed().as_secs_f64());
                    }
                    if let Some(t) = sent {
                        upstream_seconds.observe(t.elapsed().as_secs_f64());
                    }
                    masking.on_ready(messages::ready_status(&f.body).unwrap_or(b'I'));
                    f.encode(&mut out);
                    Ok(())
                }
                Route::Pass => {
                    match (
                        masked_sql.take(),
                        std::mem::replace(&mut notify, Notify::Pass),
                    ) {
                        (Some(sql), _) => super::withhold::relay(f, &sql).encode(&mut out),
                        (None, Notify::Mask(masks)) => {
                            masked_notification(f, &masks, masking.masker()).encode(&mut out)
                        }
                        (None, Notify::Drop) => {}
                        (None, Notify::Pass) => f.encode(&mut out),
                    }
                    Ok(())
                }
            };
            if let Err(e) = handled {
                // Never let a value through that the policy says to mask: end the session.
                fatal("42501", format!("portcullis: result refused: {e}")).encode(&mut out);
                write_client(&client, &out, traffic).await?;
                return Err(PgError::Refused(e.to_string()));
            }
            if out.len() >= WRITE_BATCH {
                write_client(&client, &out, traffic).await?;
                out.clear();
            }
        }
        write_client(&client, &out, traffic).await?;
        if !server.fill().await? {
            return Ok(End::Closed);
        }
    }
}

/// What the server's answer means for the prepared statements the engine keeps: a
/// ParseComplete, a PREPARE's CommandComplete, or a query that ends without an error,
/// makes them; an error unmakes the ones still waiting (a failed Parse, a failed PREPARE,
/// one after the failed statement of its query), so the name is free again. A PREPARE
/// that completed stays made when a later statement of its query fails: prepared
/// statements are not transactional.
fn settle_prepared(st: &mut State, f: &Frame) {
    let tag = f.tag;
    if !matches!(
        tag,
        be::ERROR_RESPONSE | be::PARSE_COMPLETE | be::READY_FOR_QUERY | be::COMMAND_COMPLETE
    ) {
        return;
    }
    let names: Vec<String> = match st.tracker.head() {
        Some(Expect::Parse {
            denied: None,
            name: Some(n),
        }) => vec![n.clone()],
        Some(Expect::Query { ctx: Some(j), .. }) => j
            .classification
            .statements
            .iter()
            .filter(|s| s.kind == Kind::Prepare)
            .filter_map(|s| s.prepared.clone())
            .collect(),
        _ => return,
    };
    if tag == be::COMMAND_COMPLETE {
        // The query's PREPAREs complete in order: this is the first still waiting.
        if messages::command_tag(&f.body).is_ok_and(|t| t == "PREPARE") {
            for n in &names {
                if let Some(p) = st.prepared.get_mut(n)
                    && !p.confirmed
                {
                    p.confirmed = true;
                    break;
                }
            }
        }
        return;
    }
    for n in names {
        match tag {
            be::ERROR_RESPONSE => forget_unmade(st, &n),
            be::PARSE_COMPLETE | be::READY_FOR_QUERY => {
                if let Some(p) = st.prepared.get_mut(&n) {
                    p.confirmed = true;
                }
            }
            _ => {}
        }
    }
}

/// A statement the server did not make. The unnamed one is gone on the server whatever
/// made it (a Parse drops it first).
fn forget_unmade(st: &mut State, name: &str) {
    if name.is_empty() || st.prepared.get(name).is_some_and(|p| !p.confirmed) {
        st.prepared.remove(name);
    }
}

/// A notification for a session that listened under masks, its payload masked. One that
/// cannot be read is not relayed as it is: its payload goes.
fn masked_notification(f: Frame, masks: &[Arc<MaskSpec>], masker: &Masker) -> Frame {
    match messages::notification(&f.body) {
        Ok((pid, channel, payload)) => {
            match crate::masking::rows::mask_payload(masks, masker, payload) {
                Some(masked) => messages::notification_frame(pid, channel, &masked),
                None => f,
            }
        }
        Err(_) => messages::notification_frame(0, "", ""),
    }
}

/// What the client sent for a portal: the statement's text and, a line each, the
/// parameters it sent as text (a Bind that decoded once decodes again).
fn sent_text(sql: &str, bind: &[u8]) -> Arc<str> {
    let params = messages::Bind::text_params(bind).unwrap_or_default();
    if params.is_empty() {
        return sql.into();
    }
    let mut text = String::from(sql);
    for p in params {
        text.push('\n');
        text.push_str(p);
    }
    text.into()
}

/// The text of the statement the server is answering, when its results are masked: what
/// the client sent, which its errors may quote.
fn masked_statement_sql(st: &State, masking: &ResultMasking) -> Option<Arc<str>> {
    match st.tracker.head()? {
        Expect::Query {
            ctx: Some(j),
            sql: Some(sql),
            ..
        } => {
            let prepared = |n: &str| st.prepared_ctx(n);
            (0..j.classification.statements.len().max(1))
                .any(|k| results::applies(j, k, &prepared).is_some())
                .then(|| sql.clone())
        }
        Expect::Execute { portal } if masking.masks_portal(portal) => st
            .portals
            .get(portal)
            .map(|p| p.sent.clone().unwrap_or_else(|| p.sql.clone())),
        _ => None,
    }
}

async fn write_client(
    client: &tokio::sync::Mutex<WriteHalf<Stream>>,
    out: &[u8],
    traffic: &Traffic,
) -> Result<(), PgError> {
    if out.is_empty() {
        return Ok(());
    }
    client
        .lock()
        .await
        .write_all(out)
        .await
        .map_err(PgError::ClientIo)?;
    traffic
        .to_client
        .fetch_add(out.len() as u64, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}
