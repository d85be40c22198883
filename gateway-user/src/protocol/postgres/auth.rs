//! Authenticating to a server with credentials Portcullis holds (inject mode and the
//! catalog connection): SCRAM-SHA-256 (RFC 5802, 7677), MD5 and cleartext.
//!
//! The password is read when needed (`crate::secret`), so rotation needs no restart. It is
//! never logged.

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use bytes::{BufMut, BytesMut};
use hmac::Hmac;
use sha2::{Digest, Sha256};

use super::{
    codec::{Frame, put_cstr},
    messages::fe,
};
use crate::{config::Credentials, digest::hex};

type HmacSha256 = Hmac<Sha256>;

/// Most PBKDF2 iterations accepted from a server (PostgreSQL's default is 4096).
const MAX_ITERATIONS: u32 = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the password: {0}")]
    Secret(#[from] crate::secret::SecretError),
    #[error("the server's SCRAM exchange is invalid: {0}")]
    Scram(String),
    #[error("the server asked for an authentication method Portcullis does not support (code {0})")]
    Unsupported(i32),
    #[error("the server's SCRAM signature does not verify: it does not know the password")]
    ServerSignature,
}

/// Reads the password of a credential.
pub fn password(c: &Credentials) -> Result<String, AuthError> {
    Ok(crate::secret::read(&c.password)?)
}

pub fn password_message(password: &str) -> Frame {
    let mut b = BytesMut::new();
    put_cstr(&mut b, password);
    Frame::new(fe::PASSWORD, b.freeze())
}

/// `md5` + md5(md5(password + user) + salt), in hex.
pub fn md5_response(user: &str, password: &str, salt: &[u8]) -> String {
    let inner = hex(&md5::Md5::digest(
        [password.as_bytes(), user.as_bytes()].concat(),
    ));
    let outer = hex(&md5::Md5::digest([inner.as_bytes(), salt].concat()));
    format!("md5{outer}")
}

fn hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    crate::digest::hmac_sha256(key, &[msg]).to_vec()
}

/// A SCRAM-SHA-256 exchange without channel binding.
pub struct Scram {
    password: String,
    client_nonce: String,
    client_first_bare: String,
    server_signature: Option<Vec<u8>>,
}

impl Scram {
    pub const MECHANISM: &'static str = "SCRAM-SHA-256";

    pub fn new(password: &str) -> Self {
        let nonce: [u8; 18] = rand::random();
        let client_nonce = B64.encode(nonce);
        // PostgreSQL takes the user from the startup packet; the SCRAM name stays empty.
        let client_first_bare = format!("n=,r={client_nonce}");
        Self {
            password: password.to_owned(),
            client_nonce,
            client_first_bare,
            server_signature: None,
        }
    }

    /// SASLInitialResponse.
    pub fn initial(&self) -> Frame {
        let first = format!("n,,{}", self.client_first_bare);
        let mut b = BytesMut::new();
        put_cstr(&mut b, Self::MECHANISM);
        b.put_i32(first.len() as i32);
        b.extend_from_slice(first.as_bytes());
        Frame::new(fe::PASSWORD, b.freeze())
    }

    /// Answers the server-first message with the client-final one (SASLResponse).
    pub fn respond(&mut self, server_first: &[u8]) -> Result<Frame, AuthError> {
        let bad = |why: &str| AuthError::Scram(why.to_owned());
        let s = std::str::from_utf8(server_first).map_err(|_| bad("not UTF-8"))?;
        let (mut nonce, mut salt, mut iter) = (None, None, None);
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => {
                    salt = Some(B64.decode(v).map_err(|_| bad("salt is not base64"))?)
                }
                Some(("i", v)) => {
                    iter = Some(v.parse::<u32>().map_err(|_| bad("bad iteration count"))?)
                }
                _ => {}
            }
        }
        let nonce = nonce.ok_or_else(|| bad("no nonce"))?;
        let salt = salt.ok_or_else(|| bad("no salt"))?;
        let iter = iter.ok_or_else(|| bad("no iteration count"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(bad("the server nonce does not extend ours"));
        }
        if iter == 0 || iter > MAX_ITERATIONS {
            return Err(bad("iteration count out of range"));
        }
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2::<HmacSha256>(self.password.as_bytes(), &salt, iter, &mut salted)
            .map_err(|_| bad("PBKDF2 failed"))?;
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(&client_key);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{s},{without_proof}", self.client_first_bare);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(&signature)
            .map(|(a, b)| a ^ b)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        let final_msg = format!("{without_proof},p={}", B64.encode(proof));
        Ok(Frame::new(
            fe::PASSWORD,
            bytes::Bytes::from(final_msg.into_bytes()),
        ))
    }

    /// Verifies the server-final message (`v=...`): the server knew the password too.
    pub fn verify(&self, server_final: &[u8]) -> Result<(), AuthError> {
        let s =
            std::str::from_utf8(server_final).map_err(|_| AuthError::Scram("not UTF-8".into()))?;
        let v = s
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or_else(|| AuthError::Scram(format!("no verifier in `{s}`")))?;
        let got = B64
            .decode(v)
            .map_err(|_| AuthError::Scram("verifier is not base64".into()))?;
        match &self.server_signature {
            Some(expected) if *expected == got => Ok(()),
            _ => Err(AuthError::ServerSignature),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_matches_postgres() {
        // SELECT 'md5' || md5(md5('secret' || 'alice') || 'salt');
        let inner = hex(&md5::Md5::digest(b"secretalice"));
        let expect = format!(
            "md5{}",
            hex(&md5::Md5::digest([inner.as_bytes(), b"salt"].concat()))
        );
        assert_eq!(md5_response("alice", "secret", b"salt"), expect);
        assert_eq!(expect.len(), 35);
    }

    #[test]
    fn scram_rfc7677_vector() {
        // RFC 7677 section 3: user "user", password "pencil".
        let mut s = Scram::new("pencil");
        s.client_nonce = "rOprNGfwEbeRWgbNEkqO".into();
        s.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let f = s.respond(server_first).expect("valid");
        assert_eq!(
            std::str::from_utf8(&f.body).expect("utf8"),
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .expect("server verifies");
        assert!(s.verify(b"v=AAAA").is_err());
    }

    #[test]
    fn scram_refuses_bad_servers() {
        let mut s = Scram::new("x");
        assert!(
            s.respond(b"r=someoneelse,s=AAAA,i=4096").is_err(),
            "nonce not ours"
        );
        let n = s.client_nonce.clone();
        assert!(
            s.respond(format!("r={n}xyz,s=AAAA,i=0").as_bytes())
                .is_err()
        );
        assert!(
            s.respond(format!("r={n}xyz,s=AAAA,i=99999999").as_bytes())
                .is_err()
        );
        assert!(
            s.respond(format!("r={n}xyz,s=!!,i=4096").as_bytes())
                .is_err()
        );
    }
}
