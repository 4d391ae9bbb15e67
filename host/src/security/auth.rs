//! Who may call what: the auth config file, the policy it resolves to, and
//! the decision for one call.
//!
//! ```toml
//! # Groups anyone may call. Default with a config: ["health"].
//! open = ["health", "metadata"]
//! # Groups loopback peers may call without a token. Default: none.
//! loopback = []
//!
//! [[tokens]]
//! name = "deployer"                    # named in logs and denials
//! file = "/etc/plinth/tokens/deployer" # or: env = "PLINTH_DEPLOYER_TOKEN"
//! groups = ["model-repository", "plugins"]
//! ```

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::groups::{ApiGroup, GroupSet};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    open: Option<Vec<String>>,
    #[serde(default)]
    loopback: Vec<String>,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    file: Option<PathBuf>,
    env: Option<String>,
    groups: Vec<String>,
}

/// Where a token's secret is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    File(PathBuf),
    Env(String),
}

struct Token {
    name: String,
    source: TokenSource,
    /// SHA-256 of the secret: every comparison is of 32 bytes, in constant time.
    digest: [u8; 32],
    groups: GroupSet,
}

/// The resolved rules; replaced whole when the config or a token changes.
pub struct Policy {
    /// The config file, or `None` for the built-in default.
    source: Option<PathBuf>,
    open: GroupSet,
    loopback: GroupSet,
    tokens: Vec<Token>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("source", &self.source)
            .field("open", &self.open)
            .field("loopback", &self.loopback)
            .field(
                "tokens",
                &self.tokens.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The answer for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// No token, a malformed header or an unknown token: `UNAUTHENTICATED`, 401.
    Unauthenticated(String),
    /// Known caller, group not opened to it: `PERMISSION_DENIED`, 403.
    PermissionDenied(String),
}

impl Policy {
    /// The rules without an auth config: everything but the groups that
    /// change what the server runs or maps is open; those (the model
    /// repository, plugins and shared memory) answer loopback only.
    pub fn without_config() -> Policy {
        use ApiGroup::*;
        Policy {
            source: None,
            open: [Health, Metadata, Inference, Statistics]
                .into_iter()
                .collect(),
            loopback: [ModelRepository, Plugins, SharedMemory]
                .into_iter()
                .collect(),
            tokens: Vec::new(),
        }
    }

    /// Reads the config at `path` and every token it names. Errors name the
    /// file, the token and the field, and never include a secret.
    pub fn load(path: &Path) -> Result<Policy, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| format!("auth config {}: {err}", path.display()))?;
        Policy::parse(path, &text, &|var| std::env::var(var).ok())
            .map_err(|err| format!("auth config {}: {err}", path.display()))
    }

    fn parse(
        path: &Path,
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Policy, String> {
        let file: ConfigFile = toml::from_str(text).map_err(|err| err.to_string())?;
        let open = match &file.open {
            Some(names) => GroupSet::parse(names).map_err(|err| format!("open: {err}"))?,
            None => [ApiGroup::Health].into_iter().collect(),
        };
        let loopback = GroupSet::parse(&file.loopback).map_err(|err| format!("loopback: {err}"))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut tokens: Vec<Token> = Vec::new();
        for entry in file.tokens {
            let name = entry.name;
            let what = format!("token {name:?}");
            if name.trim().is_empty() {
                return Err("a token has an empty name".into());
            }
            if tokens.iter().any(|t| t.name == name) {
                return Err(format!("{what} is declared twice"));
            }
            let groups = GroupSet::parse(&entry.groups).map_err(|err| format!("{what}: {err}"))?;
            if groups.is_empty() {
                return Err(format!("{what}: groups is empty: it would open nothing"));
            }
            let (source, secret) = match (entry.file, entry.env) {
                (Some(file), None) => {
                    let file = base.join(file);
                    let secret = std::fs::read_to_string(&file)
                        .map_err(|err| format!("{what}: reading {}: {err}", file.display()))?;
                    (TokenSource::File(file), secret)
                }
                (None, Some(var)) => {
                    let secret = env(&var).ok_or_else(|| {
                        format!("{what}: the environment variable {var} is not set")
                    })?;
                    (TokenSource::Env(var), secret)
                }
                _ => {
                    return Err(format!(
                        "{what}: expected exactly one of `file` or `env` (a secret is never written in the config itself)"
                    ));
                }
            };
            // Files usually end in a newline; the secret is what precedes it.
            let secret = secret.trim();
            if secret.is_empty() {
                return Err(format!("{what}: the secret is empty"));
            }
            if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "{what}: the secret holds whitespace or control characters, which no header can carry"
                ));
            }
            let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
            if let Some(twin) = tokens.iter().find(|t| bool::from(t.digest.ct_eq(&digest))) {
                return Err(format!(
                    "{what} has the same secret as token {:?}",
                    twin.name
                ));
            }
            tokens.push(Token {
                name,
                source,
                digest,
                groups,
            });
        }
        Ok(Policy {
            source: Some(path.to_path_buf()),
            open,
            loopback,
            tokens,
        })
    }

    /// The token files this policy read (watched for rotation).
    pub fn token_files(&self) -> Vec<PathBuf> {
        self.tokens
            .iter()
            .filter_map(|t| match &t.source {
                TokenSource::File(path) => Some(path.clone()),
                TokenSource::Env(_) => None,
            })
            .collect()
    }

    pub fn has_config(&self) -> bool {
        self.source.is_some()
    }

    /// Who may call `group`, in words, for the startup log.
    pub fn describe(&self, group: ApiGroup) -> String {
        if self.open.contains(group) {
            return "everyone".into();
        }
        let mut who = Vec::new();
        if self.loopback.contains(group) {
            who.push("loopback peers".to_owned());
        }
        let names: Vec<&str> = self
            .tokens
            .iter()
            .filter(|t| t.groups.contains(group))
            .map(|t| t.name.as_str())
            .collect();
        if !names.is_empty() {
            who.push(format!("tokens {}", names.join(", ")));
        }
        if who.is_empty() {
            "nobody".into()
        } else {
            who.join(" and ")
        }
    }

    /// Logs, group by group, who may call what.
    pub fn log(&self) {
        let source = self.source.as_ref().map_or_else(
            || "built-in default (no --auth-config)".to_owned(),
            |p| p.display().to_string(),
        );
        for group in ApiGroup::ALL {
            tracing::info!(group = group.name(), open_to = %self.describe(group), %source, "access");
        }
    }

    /// Decides one call to `group` from `peer` carrying `authorization`
    /// (the header's value, if any). A peer of unknown address is not loopback.
    pub fn decide(
        &self,
        group: ApiGroup,
        peer: Option<IpAddr>,
        authorization: Option<&[u8]>,
    ) -> Verdict {
        if self.open.contains(group) {
            return Verdict::Allow;
        }
        let loopback = peer.is_some_and(|ip| ip.to_canonical().is_loopback());
        if loopback && self.loopback.contains(group) {
            return Verdict::Allow;
        }
        if self.source.is_none() {
            let peer = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
            return Verdict::PermissionDenied(format!(
                "the `{group}` group answers only loopback peers while the server runs without --auth-config; peer {peer} is not loopback"
            ));
        }
        let Some(header) = authorization else {
            return Verdict::Unauthenticated(format!(
                "the `{group}` group needs a bearer token: send `authorization: Bearer <token>`"
            ));
        };
        let Some(presented) = bearer(header) else {
            return Verdict::Unauthenticated("authorization: expected `Bearer <token>`".to_owned());
        };
        let digest: [u8; 32] = Sha256::digest(presented).into();
        // Every token is compared, so the time taken does not say which matched.
        let mut found: Option<&Token> = None;
        for token in &self.tokens {
            if bool::from(token.digest.ct_eq(&digest)) {
                found = Some(token);
            }
        }
        match found {
            None => Verdict::Unauthenticated(
                "the bearer token is not one this server accepts".to_owned(),
            ),
            Some(token) if token.groups.contains(group) => Verdict::Allow,
            Some(token) => Verdict::PermissionDenied(format!(
                "token {:?} does not open the `{group}` group (it opens: {})",
                token.name, token.groups
            )),
        }
    }
}

/// The token of an `authorization` value: `Bearer <token>`, the scheme in
/// any case, surrounding spaces ignored.
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") || !rest.first()?.is_ascii_whitespace() {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ApiGroup::*;

    const LOOPBACK: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    const REMOTE: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 7, 0, 2)));

    fn policy(text: &str) -> Result<Policy, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("deployer"), "s3cret-deploy\n").unwrap();
        let path = dir.path().join("auth.toml");
        Policy::parse(&path, text, &|var| {
            (var == "APP_TOKEN").then(|| "app-secret".to_owned())
        })
    }

    const CONFIG: &str = r#"
        loopback = ["statistics"]
        [[tokens]]
        name = "deployer"
        file = "deployer"
        groups = ["model-repository", "plugins"]
        [[tokens]]
        name = "app"
        env = "APP_TOKEN"
        groups = ["inference", "metadata"]
    "#;

    #[test]
    fn without_a_config_the_dangerous_groups_answer_loopback_only() {
        let p = Policy::without_config();
        for group in [Health, Metadata, Inference, Statistics] {
            assert_eq!(p.decide(group, REMOTE, None), Verdict::Allow, "{group}");
            assert_eq!(p.decide(group, None, None), Verdict::Allow, "{group}");
        }
        for group in [ModelRepository, Plugins, SharedMemory] {
            assert_eq!(p.decide(group, LOOPBACK, None), Verdict::Allow, "{group}");
            let mapped = Some("::ffff:127.0.0.1".parse().unwrap());
            assert_eq!(p.decide(group, mapped, None), Verdict::Allow, "{group}");
            let v6 = Some("::1".parse().unwrap());
            assert_eq!(p.decide(group, v6, None), Verdict::Allow, "{group}");
            for peer in [REMOTE, None, Some("::ffff:10.7.0.2".parse().unwrap())] {
                let Verdict::PermissionDenied(msg) = p.decide(group, peer, Some(b"Bearer x"))
                else {
                    panic!("{group} from {peer:?} must be refused");
                };
                assert!(
                    msg.contains(group.name()) && msg.contains("loopback"),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn with_a_config_tokens_open_their_groups_and_nothing_else() {
        let p = policy(CONFIG).unwrap();
        let deploy = Some(&b"Bearer s3cret-deploy"[..]);
        let app = Some(&b"bearer   app-secret "[..]);
        assert_eq!(p.decide(Health, REMOTE, None), Verdict::Allow);
        assert_eq!(p.decide(ModelRepository, REMOTE, deploy), Verdict::Allow);
        assert_eq!(p.decide(Plugins, REMOTE, deploy), Verdict::Allow);
        assert_eq!(p.decide(Inference, REMOTE, app), Verdict::Allow);
        let Verdict::PermissionDenied(msg) = p.decide(Plugins, REMOTE, app) else {
            panic!("app may not reload plugins");
        };
        assert!(
            msg.contains("\"app\"")
                && msg.contains("plugins")
                && msg.contains("metadata, inference"),
            "{msg}"
        );
        assert!(!msg.contains("app-secret"), "never echo a token: {msg}");
        // The loopback grant is only for what the config says.
        assert_eq!(p.decide(Statistics, LOOPBACK, None), Verdict::Allow);
        assert!(matches!(
            p.decide(Statistics, REMOTE, None),
            Verdict::Unauthenticated(_)
        ));
        assert!(matches!(
            p.decide(ModelRepository, LOOPBACK, None),
            Verdict::Unauthenticated(_)
        ));
    }

    #[test]
    fn missing_malformed_and_unknown_tokens_are_unauthenticated_without_echo() {
        let p = policy(CONFIG).unwrap();
        let cases: [(Option<&[u8]>, &str); 5] = [
            (None, "needs a bearer token"),
            (Some(b"Basic czNjcmV0"), "expected `Bearer <token>`"),
            (Some(b"Bearer"), "expected `Bearer <token>`"),
            (Some(b"Bearers3cret-deploy"), "expected `Bearer <token>`"),
            (Some(b"Bearer s3cret-deplox"), "not one this server accepts"),
        ];
        for (header, want) in cases {
            let Verdict::Unauthenticated(msg) = p.decide(Inference, REMOTE, header) else {
                panic!("{header:?} must be unauthenticated");
            };
            assert!(msg.contains(want), "{header:?}: {msg}");
            assert!(
                !msg.contains("s3cret") && !msg.contains("czNjcmV0"),
                "{msg}"
            );
        }
    }

    #[test]
    fn bad_configs_are_refused_naming_the_field() {
        let cases = [
            ("open = [\"admin\"]", "open: unknown API group \"admin\""),
            (
                "[[tokens]]\nname = \"a\"\ngroups = [\"plugins\"]",
                "exactly one of `file` or `env`",
            ),
            (
                "[[tokens]]\nname = \"a\"\nenv = \"NOPE\"\ngroups = [\"plugins\"]",
                "NOPE is not set",
            ),
            (
                "[[tokens]]\nname = \"a\"\nfile = \"missing\"\ngroups = [\"plugins\"]",
                "token \"a\": reading",
            ),
            (
                "[[tokens]]\nname = \"a\"\nenv = \"APP_TOKEN\"\ngroups = []",
                "would open nothing",
            ),
            (
                "[[tokens]]\nname = \"a\"\nenv = \"APP_TOKEN\"\ngroups = [\"all\"]\n[[tokens]]\nname = \"b\"\nenv = \"APP_TOKEN\"\ngroups = [\"all\"]",
                "same secret as token \"a\"",
            ),
            ("secret = \"x\"", "unknown field `secret`"),
        ];
        for (text, want) in cases {
            let err = policy(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains("app-secret"), "{err}");
        }
    }

    #[test]
    fn a_config_keeps_health_open_unless_it_closes_it() {
        let p = policy("").unwrap();
        assert_eq!(p.decide(Health, REMOTE, None), Verdict::Allow);
        assert!(matches!(
            p.decide(Metadata, REMOTE, None),
            Verdict::Unauthenticated(_)
        ));
        let closed = policy("open = []").unwrap();
        assert!(matches!(
            closed.decide(Health, REMOTE, None),
            Verdict::Unauthenticated(_)
        ));
        assert_eq!(closed.describe(Health), "nobody");
        let p = policy(CONFIG).unwrap();
        assert_eq!(p.describe(Statistics), "loopback peers");
        assert_eq!(p.describe(Plugins), "tokens deployer");
    }
}
