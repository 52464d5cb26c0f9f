//! Where the fleet's Redis is: `fleet.redis_url`, read.
//!
//! - `redis://`, `rediss://` (TLS), `unix://`: one server, or a managed service's primary
//!   endpoint (one DNS name that moves to the new primary at a failover);
//! - `redis+sentinel://` and `rediss+sentinel://` (TLS to the sentinels and to the primary): a
//!   Sentinel set, `[user[:password]@]host[:port][,host[:port]…]/master_name[/db]`, port 26379
//!   by default. The user and password are the primary's; sentinels that need their own give
//!   them as `?sentinel_username=…&sentinel_password=…`.
//!
//! One URL rather than a section of its own: the contract turns the fleet on with
//! `fleet.redis_url`, and deployments keep that one value in a secret.

use redis::{ConnectionAddr, IntoConnectionInfo};

/// The port a sentinel listens on unless its address says otherwise.
pub const SENTINEL_PORT: u16 = 26379;

/// A Sentinel set, as `fleet.redis_url` names it.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelSet {
    /// The sentinels, as `(host, port)`.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the primary under.
    pub master: String,
    /// TLS to the sentinels and to the primary.
    pub tls: bool,
    /// The primary's database.
    pub db: i64,
    /// The primary's user and password.
    pub username: Option<String>,
    pub password: Option<String>,
    /// The sentinels' own user and password, when they need them.
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for SentinelSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SentinelSet")
            .field("sentinels", &self.sentinels)
            .field("master", &self.master)
            .field("tls", &self.tls)
            .field("db", &self.db)
            .finish_non_exhaustive()
    }
}

impl SentinelSet {
    /// The sentinels as the redis crate addresses them.
    pub fn addresses(&self) -> Vec<ConnectionAddr> {
        self.sentinels
            .iter()
            .map(|(host, port)| {
                if self.tls {
                    ConnectionAddr::TcpTls {
                        host: host.clone(),
                        port: *port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(host.clone(), *port)
                }
            })
            .collect()
    }

    /// How the set is named in errors: scheme, sentinels and master, never the credentials.
    pub fn shown(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}+sentinel://{}/{}", hosts.join(","), self.master)
    }
}

/// What `fleet.redis_url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// One server or a managed primary endpoint: the URL as the redis crate reads it.
    Server(String),
    /// A Sentinel set.
    Sentinel(SentinelSet),
}

/// Reads `fleet.redis_url`; the error says what is wrong with it.
pub fn parse(url: &str) -> Result<Address, String> {
    let url = url.trim();
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
        (true, rest)
    } else {
        return url
            .into_connection_info()
            .map(|_| Address::Server(url.to_owned()))
            .map_err(|e| e.to_string());
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    let sentinels = hosts
        .split(',')
        .map(sentinel)
        .collect::<Result<Vec<_>, _>>()?;
    // The rest is an ordinary URL's: let the url crate decode the user, path and query.
    let parsed = url::Url::parse(&format!("redis://{userinfo}sentinels{tail}"))
        .map_err(|e| format!("not a Sentinel URL: {e}"))?;
    let mut path = parsed
        .path_segments()
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty());
    let master = path
        .next()
        .map(|m| decoded(m).into_owned())
        .ok_or("a Sentinel URL names its master after the sentinels: …/master_name")?;
    let db = match path.next() {
        None => 0,
        Some(db) => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or_else(|| format!("the database {db:?} is not a number"))?,
    };
    if path.next().is_some() {
        return Err("a Sentinel URL's path is /master_name or /master_name/db".to_owned());
    }
    let some = |s: &str| (!s.is_empty()).then(|| decoded(s).into_owned());
    let mut set = SentinelSet {
        sentinels,
        master,
        tls,
        db,
        username: some(parsed.username()),
        password: parsed.password().and_then(some),
        sentinel_username: None,
        sentinel_password: None,
    };
    for (key, value) in parsed.query_pairs() {
        match &*key {
            "sentinel_username" => set.sentinel_username = Some(value.into_owned()),
            "sentinel_password" => set.sentinel_password = Some(value.into_owned()),
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(Address::Sentinel(set))
}

fn decoded(s: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy()
}

/// One sentinel, `host[:port]` (an IPv6 host in brackets).
fn sentinel(address: &str) -> Result<(String, u16), String> {
    let bad = || format!("the sentinel address {address:?} is not host[:port]");
    let (host, port) = match address.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            (host, port.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (address, SENTINEL_PORT),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 || host.contains(['@', '/', '?', '#', ' ']) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_sentinel_url_names_the_set_the_master_and_both_credentials() {
        let Ok(Address::Sentinel(set)) = parse(
            "rediss+sentinel://worker:p%40ss@s1:26380,s2,[::1]:26381/prod-main/2\
             ?sentinel_password=sent",
        ) else {
            panic!("not read as a Sentinel set");
        };
        assert_eq!(
            set.sentinels,
            [
                ("s1".to_owned(), 26380),
                ("s2".to_owned(), SENTINEL_PORT),
                ("::1".to_owned(), 26381)
            ]
        );
        assert_eq!(set.master, "prod-main");
        assert!(set.tls);
        assert_eq!(set.db, 2);
        assert_eq!(set.username.as_deref(), Some("worker"));
        assert_eq!(set.password.as_deref(), Some("p@ss"));
        assert_eq!(set.sentinel_username, None);
        assert_eq!(set.sentinel_password.as_deref(), Some("sent"));
        assert!(!format!("{set:?}").contains("p@ss"));
        assert!(!set.shown().contains("p@ss"));
    }

    #[test]
    fn a_plain_url_is_one_server() {
        assert_eq!(
            parse("redis://127.0.0.1:6379/0"),
            Ok(Address::Server("redis://127.0.0.1:6379/0".to_owned()))
        );
    }

    #[test]
    fn what_a_sentinel_url_gets_wrong_is_said() {
        for (url, says) in [
            ("redis+sentinel://s1,s2", "master_name"),
            ("redis+sentinel://s1:x/m", "s1:x"),
            ("redis+sentinel://s1,,s2/m", "\"\""),
            ("redis+sentinel://s1/m/zero", "zero"),
            ("redis+sentinel://s1/m/0/more", "path"),
            ("redis+sentinel://s1/m?password=x", "password"),
        ] {
            let error = parse(url).expect_err(url);
            assert!(error.contains(says), "{url}: {error}");
        }
    }

    proptest! {
        /// Whatever the text, reading it ends in an address or an error, never a panic.
        #[test]
        fn any_text_is_read_or_refused(url in "(redis|rediss)(\\+sentinel)?://\\PC{0,60}") {
            let _ = parse(&url);
        }

        /// A set written out is read back as it was.
        #[test]
        fn a_written_set_is_read_back(
            hosts in prop::collection::vec(("[a-z][a-z0-9.-]{0,20}", 1u16..), 1..5),
            master in "[A-Za-z0-9_-]{1,20}",
            password in "\\PC{1,20}",
            db in 0i64..16,
            tls in any::<bool>(),
        ) {
            let written: Vec<String> = hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            let encoded = percent_encoding::utf8_percent_encode(
                &password,
                percent_encoding::NON_ALPHANUMERIC,
            );
            let scheme = if tls { "rediss" } else { "redis" };
            let url = format!(
                "{scheme}+sentinel://:{encoded}@{}/{master}/{db}",
                written.join(",")
            );
            let Ok(Address::Sentinel(set)) = parse(&url) else {
                return Err(TestCaseError::fail(format!("{url} not read")));
            };
            prop_assert_eq!(set.sentinels, hosts);
            prop_assert_eq!(set.master, master);
            prop_assert_eq!(set.password.as_deref(), Some(password.as_str()));
            prop_assert_eq!(set.db, db);
            prop_assert_eq!(set.tls, tls);
        }
    }
}
