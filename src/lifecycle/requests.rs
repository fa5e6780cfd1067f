//! What a client may ask for when creating a lifecycle object, and its validation: every
//! refusal names the field. Unknown fields are refused by serde (`deny_unknown_fields`).
//! A container backend is answered "not supported" before anything else is looked at.

use serde::Deserialize;

use super::LifecycleError;
use crate::domain::lifecycle::{ADMIN_OWNER, Backend, Kind, Object, OsFamily, Protocol, Refusal, Spec, Traits, check_traits};

const MAX_SCRIPTS: usize = 50;
const MAX_SCRIPT_CHARS: usize = 8_000;
const MAX_ENVIRONMENTS: u32 = 1_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseimageRequest {
    pub name: String,
    /// The template the nodes hold (a linked clone's base).
    pub template: String,
    #[serde(rename = "type", default)]
    pub backend: Option<Backend>,
    #[serde(default)]
    pub os: Option<OsFamily>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub scripts: Vec<String>,
    #[serde(default)]
    pub interactive: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentRequest {
    pub name: String,
    #[serde(rename = "type", default)]
    pub backend: Option<Backend>,
    #[serde(default)]
    pub os: Option<OsFamily>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub scripts: Vec<String>,
    #[serde(default)]
    pub hostname: Option<String>,
    /// Stop in ConfigInteractive until the owner says done (default true).
    #[serde(default)]
    pub interactive: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    pub name: String,
    #[serde(rename = "type", default)]
    pub backend: Option<Backend>,
    #[serde(default)]
    pub os: Option<OsFamily>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    #[serde(default)]
    pub scripts: Vec<String>,
    #[serde(default)]
    pub interactive: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRequest {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "type", default)]
    pub backend: Option<Backend>,
    #[serde(default)]
    pub os: Option<OsFamily>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
    pub command: String,
}

/// A transition's request: CloneTemplate, CreateSnapshot or RunApp.
#[derive(Debug, Clone)]
pub enum DeriveRequest {
    Environment(EnvironmentRequest),
    Deployment(DeploymentRequest),
    App(AppRequest),
}

impl BaseimageRequest {
    pub(super) fn validate(self) -> Result<(Traits, Spec, String), LifecycleError> {
        let traits = Traits {
            backend: self.backend.unwrap_or(Backend::Vm),
            os: self.os.unwrap_or(OsFamily::Linux),
            protocol: self.protocol.unwrap_or(Protocol::Vnc),
        };
        check_traits(&traits)?;
        let name = check_name("name", &self.name)?;
        if self.template.is_empty() || self.template.len() > 200 || self.template.chars().any(char::is_control) {
            return Err(LifecycleError::invalid("template", "1 to 200 printable characters"));
        }
        check_scripts(&self.scripts)?;
        let spec = Spec { template: Some(self.template), scripts: self.scripts, interactive: self.interactive, ..Spec::default() };
        Ok((traits, spec, name))
    }
}

impl DeriveRequest {
    pub fn kind(&self) -> Kind {
        match self {
            DeriveRequest::Environment(_) => Kind::Environment,
            DeriveRequest::Deployment(_) => Kind::Deployment,
            DeriveRequest::App(_) => Kind::App,
        }
    }

    fn choices(&self) -> (Option<Backend>, Option<OsFamily>, Option<Protocol>) {
        match self {
            DeriveRequest::Environment(r) => (r.backend, r.os, r.protocol),
            DeriveRequest::Deployment(r) => (r.backend, r.os, r.protocol),
            DeriveRequest::App(r) => (r.backend, r.os, r.protocol),
        }
    }

    /// Containers are answered before anything else, whatever the parent.
    pub(super) fn refuse_unsupported(&self) -> Result<(), LifecycleError> {
        match self.choices().0 {
            Some(Backend::Container) => Err(Refusal::NotSupported("the container backend".into()).into()),
            _ => Ok(()),
        }
    }

    /// The new object's traits (its parent's; the protocol may change), spec and name.
    pub(super) fn validate(self, parent: &Object) -> Result<(Traits, Spec, String), LifecycleError> {
        let (backend, os, protocol) = self.choices();
        if backend.is_some_and(|b| b != parent.traits.backend) {
            return Err(LifecycleError::invalid("type", format!("must be the parent's ({:?})", parent.traits.backend).to_lowercase()));
        }
        if os.is_some_and(|o| o != parent.traits.os) {
            return Err(LifecycleError::invalid("os", format!("must be the parent's ({:?})", parent.traits.os).to_lowercase()));
        }
        let traits = Traits { protocol: protocol.unwrap_or(parent.traits.protocol), ..parent.traits };
        check_traits(&traits)?;
        Ok(match self {
            DeriveRequest::Environment(r) => {
                check_scripts(&r.scripts)?;
                let hostname = r.hostname.map(|h| check_hostname(&h).map(|()| h)).transpose()?;
                let spec = Spec { scripts: r.scripts, interactive: r.interactive.unwrap_or(true), hostname, ..Spec::default() };
                (traits, spec, check_name("name", &r.name)?)
            }
            DeriveRequest::Deployment(r) => {
                check_scripts(&r.scripts)?;
                let spec = Spec { scripts: r.scripts, interactive: r.interactive.unwrap_or(true), ..Spec::default() };
                (traits, spec, check_name("name", &r.name)?)
            }
            DeriveRequest::App(r) => {
                if r.command.trim().is_empty() || r.command.len() > MAX_SCRIPT_CHARS || r.command.contains('\0') {
                    return Err(LifecycleError::invalid("command", format!("1 to {MAX_SCRIPT_CHARS} characters, not blank")));
                }
                let name = check_name("name", r.name.as_deref().unwrap_or("app"))?;
                (traits, Spec { command: Some(r.command), ..Spec::default() }, name)
            }
        })
    }
}

fn check_name(field: &'static str, name: &str) -> Result<String, LifecycleError> {
    if (1..=80).contains(&name.chars().count()) && !name.chars().any(char::is_control) {
        Ok(name.to_string())
    } else {
        Err(LifecycleError::invalid(field, "1 to 80 printable characters"))
    }
}

fn check_scripts(scripts: &[String]) -> Result<(), LifecycleError> {
    if scripts.len() > MAX_SCRIPTS {
        return Err(LifecycleError::invalid("scripts", format!("at most {MAX_SCRIPTS}")));
    }
    match scripts.iter().position(|s| s.trim().is_empty() || s.len() > MAX_SCRIPT_CHARS || s.contains('\0')) {
        Some(i) => Err(LifecycleError::invalid("scripts", format!("script {i} must be 1 to {MAX_SCRIPT_CHARS} characters, not blank"))),
        None => Ok(()),
    }
}

/// An RFC 1123 host name label: it goes into a command line.
fn check_hostname(h: &str) -> Result<(), LifecycleError> {
    let ok = (1..=63).contains(&h.len())
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok { Ok(()) } else { Err(LifecycleError::invalid("hostname", "1 to 63 of a-z, A-Z, 0-9 and '-', not starting or ending with '-'")) }
}

pub(super) fn check_user_name(name: &str) -> Result<(), LifecycleError> {
    let ok = (1..=40).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(LifecycleError::invalid("name", "1 to 40 characters of a-z, 0-9, '-' and '_'"));
    }
    if name == ADMIN_OWNER {
        return Err(LifecycleError::invalid("name", format!("{ADMIN_OWNER:?} is reserved")));
    }
    Ok(())
}

pub(super) fn check_max(max: u32) -> Result<u32, LifecycleError> {
    if max > MAX_ENVIRONMENTS {
        return Err(LifecycleError::invalid("max_environments", format!("at most {MAX_ENVIRONMENTS}")));
    }
    Ok(max)
}
