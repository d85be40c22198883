//! Test client: connects the ways an agent might and prints one JSON line about it.
//!
//! ```text
//! pc-probe connect ADDR [BYTES]          connect, echo BYTES (default 5), report
//! pc-probe reset ADDR                    connect, then close with a reset at once
//! pc-probe unix PATH                     connect to a Unix stream socket (`@name`:
//!                                        abstract), report
//! pc-probe fork ...                      a forked child does the rest
//! pc-probe daemonize OUTFILE ...         a double-forked, setsid'd grandchild does the rest,
//!                                        writing its JSON to OUTFILE
//! pc-probe rename NAME ...               prctl(PR_SET_NAME) then the rest
//! pc-probe thread ADDR                   connect (as `connect ADDR`), then a thread connects
//!                                        and exits; prints {"main", "thread"} and waits for
//!                                        its stdin to close
//! pc-probe many ADDR CONNS BYTES         CONNS concurrent connections echo BYTES each
//! pc-probe rate ADDR SECS CONC           connect, 1-byte echo, close, in CONC loops for SECS
//! pc-probe latency ADDR COUNT            COUNT 1-byte round trips on one connection
//! pc-probe queue ADDR1 ADDR2 WAIT_MS     a connection to ADDR1 echoes and stays open; one to
//!                                        ADDR2 is echoed within WAIT_MS or not; the first
//!                                        closes; is the second echoed then. With a 4th
//!                                        argument `give-up`, the second resets instead
//!                                        while it waits, then the first closes
//! pc-probe relay LISTEN UPSTREAM WORKERS  a plain TCP relay (the benchmarks' reference):
//!                                        prints {"listening": ADDR}, relays until killed
//! ```
//! Only loopback addresses are accepted (the tests' network rule).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use serde_json::{Value, json};

fn loopback(addr: &str) -> SocketAddr {
    let a: SocketAddr = addr.parse().expect("ADDR is ip:port");
    let ok = match a.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback() || v4.is_unspecified(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    };
    assert!(ok, "pc-probe only talks to loopback, not {a}");
    a
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn connect(addr: &str, bytes: usize) -> Value {
    let a = loopback(addr);
    // SAFETY: getpid/gettid have no preconditions.
    let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    let s = match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            return json!({"ok": false, "pid": pid, "error": e.to_string(),
                          "errno": e.raw_os_error(), "kind": format!("{:?}", e.kind())});
        }
    };
    let mut v = echo_over(s, &pattern(bytes), 0);
    v["pid"] = pid.into();
    v["tid"] = tid.into();
    v
}

/// Sends `data[sent..]` (the rest of what the connect sent), half-closes, reads the echo to
/// the end: whether it came back whole, and the socket's addresses.
fn echo_over(mut s: TcpStream, data: &[u8], sent: usize) -> Value {
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let result = (|| -> std::io::Result<Vec<u8>> {
        s.write_all(&data[sent..])?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    })();
    match result {
        Ok(back) => json!({"ok": back == data, "local": local, "peer": peer,
                           "echoed": back.len()}),
        Err(e) => json!({"ok": false, "local": local, "peer": peer,
                         "error": e.to_string(), "kind": format!("{:?}", e.kind())}),
    }
}

/// `addr` as a C socket address.
fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage, and each branch writes a struct that
    // fits in it (sockaddr_storage is the largest socket address).
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let len = match a {
            SocketAddr::V4(v4) => {
                let sa = (&raw mut ss).cast::<libc::sockaddr_in>();
                (*sa).sin_family = libc::AF_INET as libc::sa_family_t;
                (*sa).sin_port = v4.port().to_be();
                (*sa).sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(v6) => {
                let sa = (&raw mut ss).cast::<libc::sockaddr_in6>();
                (*sa).sin6_family = libc::AF_INET6 as libc::sa_family_t;
                (*sa).sin6_port = v6.port().to_be();
                (*sa).sin6_addr.s6_addr = v6.ip().octets();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
}

/// `connect` over a stream socket made by hand: `fastopen` connects from inside the first
/// `sendto(MSG_FASTOPEN)` (TCP Fast Open, no `connect(2)`), `mptcp` is a Multipath TCP
/// socket (`IPPROTO_MPTCP`, which falls back to TCP with a server that does not speak it).
fn raw_stream(how: &str, addr: &str, bytes: usize) -> Value {
    use std::os::fd::FromRawFd as _;
    let a = loopback(addr);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let data = pattern(bytes);
    let (sa, len) = sockaddr(a);
    let family = if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let proto = if how == "mptcp" {
        libc::IPPROTO_MPTCP
    } else {
        0
    };
    // SAFETY: a socket this function owns (the TcpStream takes it over at once); the
    // address outlives the calls, which read `len` bytes of it.
    let (s, sent) = unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, proto);
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return json!({"ok": false, "pid": pid, "error": e.to_string(), "errno": e.raw_os_error()});
        }
        let s = TcpStream::from_raw_fd(fd);
        let rc = if how == "fastopen" {
            libc::sendto(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_FASTOPEN,
                (&raw const sa).cast(),
                len,
            )
        } else {
            libc::connect(fd, (&raw const sa).cast(), len) as isize
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return json!({"ok": false, "pid": pid, "error": e.to_string(), "errno": e.raw_os_error()});
        }
        (s, if how == "fastopen" { rc as usize } else { 0 })
    };
    let mut v = echo_over(s, &data, sent);
    v["pid"] = pid.into();
    v
}

/// A Unix stream connect: did it get through, and if not, with which errno. `@name` is the
/// abstract name `name`.
fn unix(path: &str) -> Value {
    use std::os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr};
    let r = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a)),
        None => std::os::unix::net::UnixStream::connect(path),
    };
    match r {
        Ok(_) => json!({"ok": true, "path": path}),
        Err(e) => json!({"ok": false, "path": path, "error": e.to_string(),
                         "errno": e.raw_os_error()}),
    }
}

/// A connection from the main thread, then one from a thread that exits; the answer is
/// printed at once, then the process lives until its stdin closes.
fn thread_then_wait(addr: &str) -> Value {
    let main = connect(addr, 5);
    let addr = addr.to_owned();
    let thread = std::thread::spawn(move || connect(&addr, 5))
        .join()
        .expect("the connecting thread");
    println!("{}", json!({"main": main, "thread": thread}));
    std::io::stdout().flush().expect("flush stdout");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    json!({"ended": true})
}

/// One byte out and, within `wait`, back: `Ok(true)` echoed, `Ok(false)` not in time.
fn echoed_within(s: &mut TcpStream, wait: Duration) -> std::io::Result<bool> {
    s.set_read_timeout(Some(wait))?;
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) if b[0] == b'q' => Ok(true),
        Ok(_) => Err(std::io::Error::other("closed or wrong byte")),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

fn queue(first: &str, second: &str, wait_ms: u64, give_up: bool) -> Value {
    let (a, b) = (loopback(first), loopback(second));
    let wait = Duration::from_millis(wait_ms);
    let result = (|| -> std::io::Result<Value> {
        let mut one = TcpStream::connect_timeout(&a, Duration::from_secs(5))?;
        one.write_all(b"q")?;
        let first_echoed = echoed_within(&mut one, Duration::from_secs(5))?;
        // The handshake completes in the kernel whether or not the proxy takes it.
        let mut two = TcpStream::connect_timeout(&b, Duration::from_secs(5))?;
        two.write_all(b"q")?;
        let second_before_close = echoed_within(&mut two, wait)?;
        if give_up {
            // The second resets while it waits; the first closes a little later.
            let second_local = two.local_addr()?.to_string();
            let reset = socket_linger_zero(&two);
            drop(two);
            std::thread::sleep(Duration::from_millis(200));
            drop(one);
            return Ok(json!({"ok": reset, "first_echoed": first_echoed,
                             "second_before_close": second_before_close,
                             "second_local": second_local}));
        }
        drop(one);
        let second_after_close =
            second_before_close || echoed_within(&mut two, Duration::from_secs(5))?;
        Ok(json!({"ok": true, "first_echoed": first_echoed,
                  "second_before_close": second_before_close,
                  "second_after_close": second_after_close}))
    })();
    result.unwrap_or_else(|e| json!({"ok": false, "error": e.to_string()}))
}

fn reset(addr: &str) -> Value {
    let a = loopback(addr);
    match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
        Ok(s) => {
            let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let sock = socket_linger_zero(&s);
            drop(s);
            json!({"ok": sock, "local": local})
        }
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

fn socket_linger_zero(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd and option struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        ) == 0
    }
}

fn many(addr: &str, conns: usize, bytes: usize) -> Value {
    let a = loopback(addr);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let data = std::sync::Arc::new(pattern(bytes));
        let mut tasks = Vec::with_capacity(conns);
        // Open every connection first, so they are all open at once.
        let mut streams = Vec::with_capacity(conns);
        let mut errors = Vec::new();
        for _ in 0..conns {
            match tokio::net::TcpStream::connect(a).await {
                Ok(s) => streams.push(s),
                Err(e) => errors.push(e.to_string()),
            }
        }
        let opened = streams.len();
        for s in streams {
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let (mut r, mut w) = s.into_split();
                let writer = async {
                    w.write_all(&data).await?;
                    w.shutdown().await
                };
                let reader = async {
                    let mut back = Vec::with_capacity(data.len());
                    r.read_to_end(&mut back).await?;
                    Ok::<_, std::io::Error>(back)
                };
                let (wr, back) = tokio::join!(writer, reader);
                wr?;
                let back = back?;
                if back[..] != data[..] {
                    return Err(std::io::Error::other(format!(
                        "{local}: {} bytes came back, not the {} sent",
                        back.len(),
                        data.len()
                    )));
                }
                Ok(back.len())
            }));
        }
        let mut ok = 0usize;
        let mut total = 0usize;
        for t in tasks {
            match t.await {
                Ok(Ok(n)) => {
                    ok += 1;
                    total += n;
                }
                Ok(Err(e)) => errors.push(e.to_string()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        errors.truncate(5);
        json!({"ok": ok, "opened": opened, "bytes": total, "errors": errors})
    })
}

/// Connections per second: each loop connects, echoes one byte, closes.
fn rate(addr: &str, secs: f64, conc: usize) -> Value {
    let a = loopback(addr);
    let until = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut done, mut failed) = (0u64, 0u64);
                while std::time::Instant::now() < until {
                    let ok = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect(a)?;
                        s.set_nodelay(true)?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    })();
                    if ok.is_ok() {
                        done += 1;
                    } else {
                        failed += 1;
                    }
                }
                (done, failed)
            })
        })
        .collect();
    let (mut done, mut failed) = (0, 0);
    for t in threads {
        let (d, f) = t.join().expect("thread");
        done += d;
        failed += f;
    }
    json!({"per_sec": done as f64 / secs, "done": done, "failed": failed})
}

/// 1-byte request/response round trips on one open connection, in microseconds.
fn latency(addr: &str, count: usize) -> Value {
    let a = loopback(addr);
    let mut s = TcpStream::connect(a).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let mut b = [0u8; 1];
    for _ in 0..1000 {
        s.write_all(b"x").expect("write");
        s.read_exact(&mut b).expect("read");
    }
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = std::time::Instant::now();
        s.write_all(b"x").expect("write");
        s.read_exact(&mut b).expect("read");
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
    json!({"p50_us": q(0.50), "p99_us": q(0.99), "mean_us": samples.iter().sum::<f64>() / samples.len() as f64})
}

/// The simplest good relay a Rust engineer would write, as the floor the benchmarks
/// compare the proxy against: WORKERS threads, each a single-threaded tokio runtime with
/// its own `SO_REUSEPORT` listener (the proxy's own layout), accepting, connecting
/// upstream and copying both ways with half-close. No origin lookup, identity, policy or
/// records: what is left is the cost of relaying through a user-space process at all.
fn relay(listen: &str, upstream: &str, workers: usize) -> Value {
    let mut at = loopback(listen);
    let upstream = loopback(upstream);
    let mut threads = Vec::new();
    for _ in 0..workers.max(1) {
        let socket = match at {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .expect("socket");
        socket.set_reuseport(true).expect("SO_REUSEPORT");
        socket.bind(at).expect("bind relay");
        at = socket.local_addr().expect("relay addr");
        // The runtime is built here so the socket starts listening (registered with it)
        // before the address is printed; its thread then drives it.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let l = {
            let _entered = rt.enter();
            socket.listen(1024).expect("listen")
        };
        threads.push(std::thread::spawn(move || {
            rt.block_on(async move {
                loop {
                    let Ok((mut client, _)) = l.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                }
            });
        }));
    }
    println!("{}", json!({"listening": at.to_string()}));
    for t in threads {
        let _ = t.join();
    }
    json!({"stopped": true})
}

fn run(args: &[String]) -> Value {
    match args.first().map(String::as_str) {
        Some("connect") => {
            let bytes = args.get(2).map_or(5, |b| b.parse().expect("BYTES"));
            connect(&args[1], bytes)
        }
        Some(how @ ("fastopen" | "mptcp")) => {
            raw_stream(how, &args[1], args[2].parse().expect("BYTES"))
        }
        Some("reset") => reset(&args[1]),
        Some("unix") => unix(&args[1]),
        Some("thread") => thread_then_wait(&args[1]),
        Some("rate") => rate(
            &args[1],
            args[2].parse().expect("SECS"),
            args[3].parse().expect("CONC"),
        ),
        Some("latency") => latency(&args[1], args[2].parse().expect("COUNT")),
        Some("queue") => queue(
            &args[1],
            &args[2],
            args[3].parse().expect("WAIT_MS"),
            args.get(4).is_some_and(|a| a == "give-up"),
        ),
        Some("many") => many(
            &args[1],
            args[2].parse().expect("CONNS"),
            args[3].parse().expect("BYTES"),
        ),
        Some("rename") => {
            let name = std::ffi::CString::new(args[1].as_str()).expect("name");
            // SAFETY: PR_SET_NAME with a NUL-terminated string.
            unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
            run(&args[2..])
        }
        Some("fork") => {
            // SAFETY: single-threaded here; the child only runs our code then exits.
            match unsafe { libc::fork() } {
                0 => {
                    let v = run(&args[1..]);
                    println!("{v}");
                    std::process::exit(0);
                }
                child => {
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(child, &mut status, 0) };
                    // The child printed the answer.
                    std::process::exit(0);
                }
            }
        }
        Some("daemonize") => {
            let out = args[1].clone();
            // SAFETY: as above; classic double fork with setsid in between.
            unsafe {
                match libc::fork() {
                    0 => {
                        libc::setsid();
                        if libc::fork() == 0 {
                            let v = run(&args[2..]);
                            std::fs::write(&out, v.to_string()).expect("write result");
                        }
                        libc::_exit(0);
                    }
                    child => {
                        let mut status = 0;
                        libc::waitpid(child, &mut status, 0);
                    }
                }
            }
            json!({"daemonized": true})
        }
        Some("relay") => relay(&args[1], &args[2], args[3].parse().expect("WORKERS")),
        other => panic!("unknown mode {other:?}; see the source for usage"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!("{}", run(&args));
}
