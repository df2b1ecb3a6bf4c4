//! Who is calling, and what they may do.
//!
//! A caller is identified by the kernel or by its certificate, never by anything it sends: on
//! the unix socket, the uid and gid the kernel recorded when it connected (`SO_PEERCRED`), and
//! the groups of that process; on TCP, the identity of the client certificate mutual TLS
//! verified (its URI SAN, a SPIFFE ID, or its CN; see [`crate::tls`]). The `[auth]` config maps identities to a role:
//!
//! - `admin`: every call, on every customer's VMs, and the host's own operations;
//! - `tenant`: its own customers' VMs only (it may create VMs only for them);
//! - `reader`: read-only calls, on every customer's VMs or on the customers it lists.
//!
//! A VM of a customer the caller may not see does not exist for it: every per-VM call answers
//! NOT_FOUND, as for an id never used, so ids do not leak. A caller no rule names is
//! UNAUTHENTICATED. Root, metald's own user and (unless turned off) members of the API socket's
//! group are admins, so a fresh install, whose socket only root and that group can open, works
//! as before.
//!
//! Rules are looked at before the socket's group: a tenant's user may be in the socket's group
//! (to be allowed to connect at all) without becoming an admin.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Its own customers' VMs.
    Tenant,
    /// Reads only.
    Reader,
}

impl Role {
    /// The role's name, as in the config and in the `role` label of the API metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Tenant => "tenant",
            Role::Reader => "reader",
        }
    }
}

/// One `[[auth.callers]]` rule: an identity and what it may do. Exactly one of `uid`, `gid`
/// and `identity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerRule {
    /// A unix user id.
    #[serde(default)]
    pub uid: Option<u32>,
    /// A unix group id: any member (primary or supplementary group) matches.
    #[serde(default)]
    pub gid: Option<u32>,
    /// A TLS client certificate's identity: its URI SAN (`spiffe://example.org/tenant/acme`)
    /// or, for a certificate without one, its CN.
    #[serde(default)]
    pub identity: Option<String>,
    /// Its role.
    pub role: Role,
    /// The customers a tenant acts for, or a reader may see (empty: every customer, for a
    /// reader; a tenant must list at least one).
    #[serde(default)]
    pub customers: Vec<String>,
}

/// The `[auth]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The API socket's mode. 0o660 lets only its owner (root) and its group connect; with
    /// tenants, 0o666 lets anyone connect and the rules decide (an unknown caller gets
    /// UNAUTHENTICATED).
    pub socket_mode: u32,
    /// The API socket's group (a name or a numeric gid); none: metald's own group.
    pub socket_group: Option<String>,
    /// Members of the socket's group that no rule names are admins.
    pub socket_group_admins: bool,
    /// Serve `listen = "tcp:..."` without TLS or any caller identity, every caller an admin.
    /// Only for a network that is itself trusted; metald refuses a TCP listener with neither
    /// this nor `tls`.
    pub insecure_tcp: bool,
    /// Mutual TLS on the TCP listener: callers are the identities of their certificates.
    pub tls: Option<crate::tls::TlsConfig>,
    /// Identities and their roles, looked at in order: a rule naming the caller's uid first,
    /// then the first naming one of its groups.
    pub callers: Vec<CallerRule>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            socket_mode: 0o660,
            socket_group: None,
            socket_group_admins: true,
            insecure_tcp: false,
            tls: None,
            callers: Vec::new(),
        }
    }
}

impl AuthConfig {
    /// Checks the rules: each names one identity, a tenant names its customers.
    pub fn validate(&self) -> Result<(), String> {
        if self.socket_mode > 0o777 {
            return Err(format!(
                "auth.socket_mode: {:#o} is not a permission mode (at most 0o777)",
                self.socket_mode
            ));
        }
        for (i, r) in self.callers.iter().enumerate() {
            let named = [r.uid.is_some(), r.gid.is_some(), r.identity.is_some()];
            if named.iter().filter(|n| **n).count() != 1 {
                return Err(format!(
                    "auth.callers[{i}]: name exactly one of uid, gid and identity"
                ));
            }
            if r.identity.as_deref().is_some_and(str::is_empty) {
                return Err(format!("auth.callers[{i}].identity: must not be empty"));
            }
            if r.role == Role::Tenant && r.customers.is_empty() {
                return Err(format!(
                    "auth.callers[{i}]: a tenant must list the customers it acts for"
                ));
            }
            if r.role == Role::Admin && !r.customers.is_empty() {
                return Err(format!(
                    "auth.callers[{i}]: an admin acts for every customer; remove customers"
                ));
            }
        }
        Ok(())
    }
}

/// How a caller reached metald, as the kernel or the transport says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A process on this host, through the unix socket.
    Unix {
        /// Its user.
        uid: u32,
        /// Its primary group.
        gid: u32,
        /// Its pid when it connected (for its supplementary groups).
        pid: Option<i32>,
    },
    /// A TCP peer whose certificate mutual TLS verified: its identity.
    Cert(String),
    /// A TCP peer on a listener configured with `insecure_tcp`: nobody in particular.
    InsecureTcp,
    /// Nothing identifies it.
    Unknown,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Unix { uid, .. } => write!(f, "uid:{uid}"),
            Identity::Cert(id) => f.write_str(id),
            Identity::InsecureTcp => f.write_str("tcp:insecure"),
            Identity::Unknown => f.write_str("unknown"),
        }
    }
}

/// Which customers' VMs a caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// All of them.
    All,
    /// These.
    Only(BTreeSet<String>),
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Who.
    pub identity: Identity,
    /// What it may do.
    pub role: Role,
    /// Whose VMs.
    pub scope: Scope,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No rule names the caller.
    #[error("{0} is not a known caller of this metald (no [auth] rule names it)")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
}

impl Caller {
    /// An admin (the in-process callers and tests of the layers below).
    pub fn admin(identity: Identity) -> Caller {
        Caller {
            identity,
            role: Role::Admin,
            scope: Scope::All,
        }
    }

    /// Whether VMs of `customer` exist for this caller.
    pub fn sees(&self, customer: &str) -> bool {
        match &self.scope {
            Scope::All => true,
            Scope::Only(set) => set.contains(customer),
        }
    }

    /// Refuses a reader a call that changes something.
    pub fn may_change(&self, method: &str) -> Result<(), Denied> {
        if self.role == Role::Reader {
            return Err(Denied::PermissionDenied(format!(
                "{} is a reader: {method} changes a vm",
                self.identity
            )));
        }
        Ok(())
    }

    /// Refuses a create for a customer this caller does not act for.
    pub fn may_create_for(&self, customer: &str) -> Result<(), Denied> {
        self.may_change("CreateVm")?;
        if !self.sees(customer) {
            return Err(Denied::PermissionDenied(format!(
                "{} may not create vms for customer_id {customer:?}",
                self.identity
            )));
        }
        Ok(())
    }

    /// Refuses anyone but an admin a host operation.
    pub fn may_run_host(&self, method: &str) -> Result<(), Denied> {
        if self.role != Role::Admin {
            return Err(Denied::PermissionDenied(format!(
                "{method} is a host operation, for admins only; {} is a {}",
                self.identity,
                self.role.as_str()
            )));
        }
        Ok(())
    }
}

/// The rules, ready to answer "who is this".
#[derive(Debug, Clone)]
pub struct Auth {
    cfg: AuthConfig,
    /// The API socket's group, once it is bound.
    socket_gid: Option<u32>,
    /// metald's own effective uid.
    own_uid: u32,
}

impl Auth {
    /// Rules from the config; `socket_gid` is the group the API socket was given.
    pub fn new(cfg: AuthConfig, socket_gid: Option<u32>) -> Auth {
        Auth {
            cfg,
            socket_gid,
            own_uid: rustix::process::geteuid().as_raw(),
        }
    }

    /// Who `identity` is to this metald, or why it is nobody.
    pub fn caller(&self, identity: Identity) -> Result<Caller, Denied> {
        let scoped = |r: &CallerRule, identity: Identity| Caller {
            identity,
            role: r.role,
            scope: if r.customers.is_empty() {
                Scope::All
            } else {
                Scope::Only(r.customers.iter().cloned().collect())
            },
        };
        match identity {
            Identity::Cert(ref id) => match self
                .cfg
                .callers
                .iter()
                .find(|r| r.identity.as_deref() == Some(id.as_str()))
            {
                Some(r) => Ok(scoped(r, identity)),
                None => Err(Denied::Unauthenticated(identity.to_string())),
            },
            Identity::InsecureTcp if self.cfg.insecure_tcp => Ok(Caller::admin(identity)),
            Identity::InsecureTcp | Identity::Unknown => {
                Err(Denied::Unauthenticated(identity.to_string()))
            }
            Identity::Unix { uid, gid, pid } => {
                if uid == 0 || uid == self.own_uid {
                    return Ok(Caller::admin(identity));
                }
                let rule = |r: &CallerRule| Caller {
                    identity: identity.clone(),
                    role: r.role,
                    scope: if r.customers.is_empty() {
                        Scope::All
                    } else {
                        Scope::Only(r.customers.iter().cloned().collect())
                    },
                };
                if let Some(r) = self.cfg.callers.iter().find(|r| r.uid == Some(uid)) {
                    return Ok(rule(r));
                }
                // Groups are read only when a rule or the socket's group needs them.
                let wants_groups = self.cfg.callers.iter().any(|r| r.gid.is_some())
                    || (self.cfg.socket_group_admins && self.socket_gid.is_some());
                if !wants_groups {
                    return Err(Denied::Unauthenticated(identity.to_string()));
                }
                let groups = member_of(gid, pid);
                if let Some(r) = self
                    .cfg
                    .callers
                    .iter()
                    .find(|r| r.gid.is_some_and(|g| groups.contains(&g)))
                {
                    return Ok(rule(r));
                }
                if self.cfg.socket_group_admins
                    && self.socket_gid.is_some_and(|g| groups.contains(&g))
                {
                    return Ok(Caller::admin(identity));
                }
                Err(Denied::Unauthenticated(identity.to_string()))
            }
        }
    }
}

/// The groups of a caller: its primary group, and the supplementary groups of its process
/// (`Groups:` in /proc/PID/status; none when it has exited).
fn member_of(gid: u32, pid: Option<i32>) -> BTreeSet<u32> {
    let mut groups = BTreeSet::from([gid]);
    if let Some(status) =
        pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        && let Some(line) = status.lines().find_map(|l| l.strip_prefix("Groups:"))
    {
        groups.extend(
            line.split_whitespace()
                .filter_map(|g| g.parse::<u32>().ok()),
        );
    }
    groups
}

/// The identity of the caller of a request, from what the transport recorded.
pub fn identity_of(ext: &http::Extensions) -> Identity {
    use tonic::transport::server::{TcpConnectInfo, UdsConnectInfo};
    if let Some(info) = ext.get::<UdsConnectInfo>() {
        return match info.peer_cred {
            Some(c) => Identity::Unix {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            None => Identity::Unknown,
        };
    }
    if let Some(peer) = ext.get::<crate::tls::TlsPeer>() {
        return peer
            .identity
            .clone()
            .map_or(Identity::Unknown, Identity::Cert);
    }
    if ext.get::<TcpConnectInfo>().is_some() {
        return Identity::InsecureTcp;
    }
    Identity::Unknown
}

/// Who the caller of a request is (or why nobody), put into the request's extensions by
/// [`AuthLayer`] before any service sees it; the API's handlers and the API metrics read it.
#[derive(Debug, Clone)]
pub struct Authn(pub Result<Caller, Denied>);

impl Authn {
    /// The caller's role for the `role` label of the API metrics (`none`: not authenticated).
    pub fn role_label(&self) -> &'static str {
        self.0.as_ref().map_or("none", |c| c.role.as_str())
    }
}

/// A tower layer that resolves each request's caller once, from what the transport recorded,
/// and records it in the request as [`Authn`].
#[derive(Debug, Clone)]
pub struct AuthLayer(pub std::sync::Arc<Auth>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.0.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around the gRPC server.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: std::sync::Arc<Auth>,
}

impl<S, B> tower::Service<http::Request<B>> for AuthService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let who = self.auth.caller(identity_of(req.extensions()));
        req.extensions_mut().insert(Authn(who));
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(uid: u32, gid: u32) -> Identity {
        Identity::Unix {
            uid,
            gid,
            pid: None,
        }
    }

    fn rules() -> AuthConfig {
        AuthConfig {
            callers: vec![
                CallerRule {
                    uid: Some(1001),
                    gid: None,
                    identity: None,
                    role: Role::Tenant,
                    customers: vec!["acme".into()],
                },
                CallerRule {
                    uid: None,
                    gid: Some(2000),
                    identity: None,
                    role: Role::Reader,
                    customers: vec![],
                },
            ],
            ..AuthConfig::default()
        }
    }

    #[test]
    fn roles_come_from_uid_then_group_then_the_socket_group() {
        let auth = Auth::new(rules(), Some(3000));
        assert_eq!(auth.caller(unix(0, 0)).unwrap().role, Role::Admin);
        let t = auth.caller(unix(1001, 3000)).unwrap();
        // A rule wins over the socket's group.
        assert_eq!(t.role, Role::Tenant);
        assert!(t.sees("acme") && !t.sees("globex"));
        assert!(t.may_create_for("acme").is_ok());
        assert!(matches!(
            t.may_create_for("globex"),
            Err(Denied::PermissionDenied(_))
        ));
        assert!(t.may_run_host("Reconcile").is_err());
        let r = auth.caller(unix(1500, 2000)).unwrap();
        assert_eq!((r.role, r.sees("anyone")), (Role::Reader, true));
        assert!(r.may_change("DeleteVm").is_err());
        assert_eq!(auth.caller(unix(1600, 3000)).unwrap().role, Role::Admin);
        assert!(matches!(
            auth.caller(unix(1700, 1700)),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(auth.caller(Identity::Unknown).is_err());
        assert!(auth.caller(Identity::InsecureTcp).is_err());
        let open = Auth::new(
            AuthConfig {
                insecure_tcp: true,
                ..AuthConfig::default()
            },
            None,
        );
        assert_eq!(
            open.caller(Identity::InsecureTcp).unwrap().role,
            Role::Admin
        );
    }

    #[test]
    fn rules_are_checked() {
        let mut c = rules();
        assert!(c.validate().is_ok());
        c.callers[0].customers.clear();
        assert!(c.validate().unwrap_err().contains("callers[0]"));
        c.callers[0].gid = Some(1);
        assert!(c.validate().unwrap_err().contains("exactly one"));
        c.callers[0].gid = None;
        c.callers[0].uid = None;
        c.callers[0].identity = Some("spiffe://example.org/tenant/acme".into());
        c.callers[0].customers = vec!["acme".into()];
        assert!(c.validate().is_ok());
        let auth = Auth::new(c, None);
        let t = auth
            .caller(Identity::Cert("spiffe://example.org/tenant/acme".into()))
            .unwrap();
        assert_eq!((t.role, t.sees("acme")), (Role::Tenant, true));
        assert!(
            auth.caller(Identity::Cert("spiffe://example.org/x".into()))
                .is_err()
        );
    }
}
