//! The entity registry: tenants, customers, users, device profiles, devices and their
//! credentials, held in the metadata group's map (DESIGN invariant 5), so every node reads it
//! locally and every change is a committed, atomic [`MetaTxn`].
//!
//! Uniqueness (a device name per tenant, an access token, a user's email) is enforced by
//! index keys that a transaction requires to be absent; the check runs at apply, in log order,
//! so two nodes creating the same name at once cannot both succeed.
//!
//! Keys: `reg/tenant/<id>`, `reg/customer/<id>`, `reg/user/<id>`, `reg/email/<email>`,
//! `reg/profile/<id>`, `reg/profile_name/<tenant>/<name>`, `reg/profile_transport/<id>` (a
//! profile's transport configuration, JSON), `reg/device/<id>`, `reg/device_transport/<id>` (a
//! device's own transport configuration, ThingsBoard's `deviceData.transportConfiguration`),
//! `reg/device_name/<tenant>/<name>`, `reg/cred/<device id>`, `reg/token/<token>`,
//! `reg/seeded`.

use bytes::Bytes;
use rand::Rng;
use serde::{Deserialize, Serialize};
use thingraft_log::{LogError, LogHandle, MetaCheck, MetaOp, MetaTxn};
use thingraft_proto::records::{DeviceRef, basic_key, mqtt_basic_hash, token_key};
use uuid::Uuid;

/// ThingsBoard's id of "no customer".
pub const NULL_UUID: Uuid = Uuid::from_u128(0x13814000_1dd2_11b2_8080_808080808080);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Authority {
    SysAdmin,
    TenantAdmin,
    CustomerUser,
}

impl Authority {
    pub fn as_str(self) -> &'static str {
        match self {
            Authority::SysAdmin => "SYS_ADMIN",
            Authority::TenantAdmin => "TENANT_ADMIN",
            Authority::CustomerUser => "CUSTOMER_USER",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: Uuid,
    pub title: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub title: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: Uuid,
    /// [`Uuid::nil`] for the system administrator.
    pub tenant_id: Uuid,
    /// [`NULL_UUID`] unless a customer user.
    pub customer_id: Uuid,
    pub email: String,
    pub authority: Authority,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub password_hash: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceProfile {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    pub description: Option<String>,
    pub is_default: bool,
    pub created_ms: i64,
    pub provision: Provision,
}

/// How devices may provision themselves into a profile (ThingsBoard's `provisionType`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProvisionType {
    #[default]
    Disabled,
    /// Any device presenting the key and secret is created.
    AllowCreateNewDevices,
    /// Only devices that already exist in the profile, once.
    CheckPreProvisionedDevices,
}

impl ProvisionType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProvisionType::Disabled => "DISABLED",
            ProvisionType::AllowCreateNewDevices => "ALLOW_CREATE_NEW_DEVICES",
            ProvisionType::CheckPreProvisionedDevices => "CHECK_PRE_PROVISIONED_DEVICES",
        }
    }

    pub fn parse(s: &str) -> Option<ProvisionType> {
        Some(match s {
            "DISABLED" => ProvisionType::Disabled,
            "ALLOW_CREATE_NEW_DEVICES" => ProvisionType::AllowCreateNewDevices,
            "CHECK_PRE_PROVISIONED_DEVICES" => ProvisionType::CheckPreProvisionedDevices,
            _ => return None,
        })
    }
}

/// A profile's provisioning settings; the key is unique across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provision {
    pub kind: ProvisionType,
    pub key: Option<String>,
    pub secret: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub customer_id: Uuid,
    pub name: String,
    /// The device profile's name (ThingsBoard's `type`).
    pub device_type: String,
    pub label: Option<String>,
    pub profile_id: Uuid,
    /// JSON text of `additionalInfo` (`null` when absent).
    pub additional_info: String,
    pub created_ms: i64,
    pub version: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CredentialsType {
    AccessToken,
    MqttBasic,
    X509Certificate,
}

impl CredentialsType {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialsType::AccessToken => "ACCESS_TOKEN",
            CredentialsType::MqttBasic => "MQTT_BASIC",
            CredentialsType::X509Certificate => "X509_CERTIFICATE",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub id: Uuid,
    pub device_id: Uuid,
    pub kind: CredentialsType,
    /// The access token (ACCESS_TOKEN) or the lookup hash (MQTT_BASIC, X509).
    pub credentials_id: String,
    /// JSON text of the value (MQTT_BASIC), PEM (X509), or `None`.
    pub value: Option<String>,
    pub created_ms: i64,
    pub version: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Log(#[from] LogError),
}

/// A new device, as the REST API asks for it.
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    pub tenant_id: Uuid,
    pub customer_id: Option<Uuid>,
    pub name: String,
    pub device_type: Option<String>,
    pub label: Option<String>,
    pub profile_id: Option<Uuid>,
    pub additional_info: Option<String>,
    pub access_token: Option<String>,
    /// The device's own transport configuration (JSON text, validated by the caller); `None`
    /// for ThingsBoard's DEFAULT.
    pub transport: Option<String>,
}

pub(crate) fn enc<T: Serialize>(v: &T) -> Bytes {
    postcard::to_stdvec(v).expect("postcard encode").into()
}

pub(crate) fn dec<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Option<T> {
    match postcard::from_bytes(b) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "undecodable registry entry");
            None
        }
    }
}

/// Metadata-map keys of revoked login sessions: `reg/revoked/{sessionId}` → until (ms).
const REVOKED_PREFIX: &str = "reg/revoked/";
/// Most run-out revocations one logout removes.
const REVOKED_SWEEP_MAX: usize = 256;

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// ThingsBoard's default access token: 20 random alphanumerics.
pub fn random_token() -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..20)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// Seed accounts of a first start (ThingsBoard's documented demo credentials by default).
#[derive(Debug, Clone)]
pub struct Seed {
    pub sysadmin: (String, String),
    pub tenant_admin: (String, String),
    pub customer_user: (String, String),
}

impl Default for Seed {
    fn default() -> Self {
        Self {
            sysadmin: ("sysadmin@thingsboard.org".into(), "sysadmin".into()),
            tenant_admin: ("tenant@thingsboard.org".into(), "tenant".into()),
            customer_user: ("customer@thingsboard.org".into(), "customer".into()),
        }
    }
}

#[derive(Clone)]
pub struct Registry {
    log: LogHandle,
}

impl Registry {
    pub(crate) fn log(&self) -> &LogHandle {
        &self.log
    }

    pub fn new(log: LogHandle) -> Self {
        Self { log }
    }

    fn get<T: for<'a> Deserialize<'a>>(&self, key: &str) -> Option<T> {
        self.log.meta_get(key).and_then(|b| dec(&b))
    }

    fn get_id(&self, key: &str) -> Option<Uuid> {
        self.get::<Uuid>(key)
    }

    /// Revokes the tokens of login session `session` (a JWT's `sessionId`) on every node, until
    /// `until_ms` (when the longest-lived of them expires). Revocations that have run out are
    /// dropped in the same transaction.
    pub async fn revoke_session(&self, session: &str, until_ms: i64) -> Result<(), RegistryError> {
        let now = now_ms();
        let mut ops: Vec<MetaOp> = self
            .log
            .meta_scan(REVOKED_PREFIX, REVOKED_SWEEP_MAX)
            .into_iter()
            .filter(|(_, v)| dec::<i64>(v).is_none_or(|until| until <= now))
            .map(|(k, _)| MetaOp::Delete(k))
            .collect();
        ops.push(MetaOp::Put(format!("{REVOKED_PREFIX}{session}"), enc(&until_ms)));
        self.log
            .meta_txn(MetaTxn {
                checks: Vec::new(),
                ops,
            })
            .await?;
        Ok(())
    }

    /// Whether login session `session` was revoked (logged out).
    pub fn session_revoked(&self, session: &str) -> bool {
        self.get::<i64>(&format!("{REVOKED_PREFIX}{session}"))
            .is_some_and(|until| until > now_ms())
    }

    /// Creates the seed tenant, customer, users and default profile unless a previous start
    /// (of this node or any other) already did. `hash` turns a password into its stored form.
    pub async fn seed(&self, seed: &Seed, hash: impl Fn(&str) -> String) -> Result<bool, RegistryError> {
        if self.log.meta_get("reg/seeded").is_some() {
            return Ok(false);
        }
        let now = now_ms();
        let tenant = Tenant {
            id: Uuid::new_v4(),
            title: "Tenant".into(),
            created_ms: now,
        };
        let customer = Customer {
            id: Uuid::new_v4(),
            tenant_id: tenant.id,
            title: "Customer A".into(),
            created_ms: now,
        };
        let user = |email: &str, pw: &str, authority, tenant_id, customer_id| User {
            id: Uuid::new_v4(),
            tenant_id,
            customer_id,
            email: email.to_lowercase(),
            authority,
            first_name: None,
            last_name: None,
            password_hash: hash(pw),
            created_ms: now,
        };
        let users = [
            user(
                &seed.sysadmin.0,
                &seed.sysadmin.1,
                Authority::SysAdmin,
                Uuid::nil(),
                NULL_UUID,
            ),
            user(
                &seed.tenant_admin.0,
                &seed.tenant_admin.1,
                Authority::TenantAdmin,
                tenant.id,
                NULL_UUID,
            ),
            user(
                &seed.customer_user.0,
                &seed.customer_user.1,
                Authority::CustomerUser,
                tenant.id,
                customer.id,
            ),
        ];
        let profile = DeviceProfile {
            id: Uuid::new_v4(),
            tenant_id: tenant.id,
            name: "default".into(),
            description: Some("Default device profile".into()),
            is_default: true,
            created_ms: now,
            provision: Provision::default(),
        };
        let mut ops = vec![
            MetaOp::Put("reg/seeded".into(), enc(&now)),
            MetaOp::Put(format!("reg/tenant/{}", tenant.id), enc(&tenant)),
            MetaOp::Put(format!("reg/customer/{}", customer.id), enc(&customer)),
        ];
        ops.extend(profile_ops(&profile));
        for u in &users {
            ops.push(MetaOp::Put(format!("reg/user/{}", u.id), enc(u)));
            ops.push(MetaOp::Put(format!("reg/email/{}", u.email), enc(&u.id)));
        }
        let r = self
            .log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Absent("reg/seeded".into())],
                ops,
            })
            .await?;
        if r.applied {
            tracing::info!(tenant = %tenant.id, "registry seeded");
        }
        Ok(r.applied)
    }

    /// A random secret shared by the whole cluster (created by the first node that asks).
    pub async fn shared_secret(&self, name: &str) -> Result<Vec<u8>, RegistryError> {
        let key = format!("reg/secret/{name}");
        if let Some(v) = self.log.meta_get(&key) {
            return Ok(v.to_vec());
        }
        let mut secret = vec![0u8; 64];
        rand::rng().fill(&mut secret[..]);
        self.log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Absent(key.clone())],
                ops: vec![MetaOp::Put(key.clone(), secret.into())],
            })
            .await?;
        self.log
            .meta_get(&key)
            .map(|v| v.to_vec())
            .ok_or(RegistryError::NotFound(key))
    }

    pub fn user_by_email(&self, email: &str) -> Option<User> {
        let id = self.get_id(&format!("reg/email/{}", email.to_lowercase()))?;
        self.user(id)
    }

    pub fn user(&self, id: Uuid) -> Option<User> {
        self.get(&format!("reg/user/{id}"))
    }

    pub fn tenant(&self, id: Uuid) -> Option<Tenant> {
        self.get(&format!("reg/tenant/{id}"))
    }

    pub fn profile(&self, id: Uuid) -> Option<DeviceProfile> {
        self.get(&format!("reg/profile/{id}"))
    }

    /// A profile's transport configuration (ThingsBoard's `profileData.transportConfiguration`,
    /// JSON text as the REST API validated it); `None` for the DEFAULT transport type.
    pub fn profile_transport(&self, id: Uuid) -> Option<String> {
        self.get(&profile_transport_key(id))
    }

    /// A device's own transport configuration (`deviceData.transportConfiguration`, JSON text);
    /// `None` for the DEFAULT type.
    pub fn device_transport(&self, id: Uuid) -> Option<String> {
        self.get(&device_transport_key(id))
    }

    pub fn profile_by_name(&self, tenant: Uuid, name: &str) -> Option<DeviceProfile> {
        let id = self.get_id(&format!("reg/profile_name/{tenant}/{name}"))?;
        self.profile(id)
    }

    /// Marks a pre-provisioned device as provisioned; false if it already was (a device
    /// provisions itself once).
    pub async fn mark_provisioned(&self, device: Uuid) -> Result<bool, RegistryError> {
        let key = format!("reg/provisioned/{device}");
        let r = self
            .log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Absent(key.clone())],
                ops: vec![MetaOp::Put(key, enc(&now_ms()))],
            })
            .await?;
        Ok(r.failed_check.is_none())
    }

    /// The profile whose provision key is `key`.
    pub fn profile_by_provision_key(&self, key: &str) -> Option<DeviceProfile> {
        let id = self.get_id(&provision_key(key))?;
        self.profile(id)
    }

    /// Creates (no `id`) or updates a tenant's device profile; names and provision keys are
    /// unique.
    pub async fn save_profile(
        &self,
        tenant: Uuid,
        id: Option<Uuid>,
        name: &str,
        description: Option<String>,
        provision: Provision,
        transport: Option<String>,
    ) -> Result<DeviceProfile, RegistryError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(RegistryError::Invalid(
                "Device profile name should be specified!".into(),
            ));
        }
        if provision.kind != ProvisionType::Disabled
            && (provision.key.as_deref().unwrap_or("").is_empty()
                || provision.secret.as_deref().unwrap_or("").is_empty())
        {
            return Err(RegistryError::Invalid(
                "Provision device key and secret should be specified!".into(),
            ));
        }
        let old = match id {
            Some(id) => Some(
                self.profile(id)
                    .filter(|p| p.tenant_id == tenant)
                    .ok_or_else(|| {
                        RegistryError::NotFound(format!("Device profile with id [{id}] is not found"))
                    })?,
            ),
            None => None,
        };
        let p = DeviceProfile {
            id: old.as_ref().map_or_else(Uuid::new_v4, |o| o.id),
            tenant_id: tenant,
            name: name.to_string(),
            description,
            is_default: old.as_ref().is_some_and(|o| o.is_default),
            created_ms: old.as_ref().map_or_else(now_ms, |o| o.created_ms),
            provision,
        };
        let name_key = format!("reg/profile_name/{tenant}/{}", p.name);
        let mut checks = Vec::new();
        let mut ops = profile_ops(&p);
        if old.as_ref().is_none_or(|o| o.name != p.name) {
            checks.push(MetaCheck::Absent(name_key));
        }
        if let Some(o) = &old {
            if o.name != p.name {
                ops.push(MetaOp::Delete(format!("reg/profile_name/{tenant}/{}", o.name)));
            }
            if let Some(k) = &o.provision.key
                && p.provision.key.as_ref() != Some(k)
            {
                ops.push(MetaOp::Delete(provision_key(k)));
            }
        }
        if let Some(k) = &p.provision.key {
            if old.as_ref().is_none_or(|o| o.provision.key.as_ref() != Some(k)) {
                checks.push(MetaCheck::Absent(provision_key(k)));
            }
            ops.push(MetaOp::Put(provision_key(k), enc(&p.id)));
        }
        if let Some(o) = &old {
            checks.push(MetaCheck::Present(format!("reg/profile/{}", o.id)));
        }
        ops.push(match transport {
            Some(t) => MetaOp::Put(profile_transport_key(p.id), enc(&t)),
            None => MetaOp::Delete(profile_transport_key(p.id)),
        });
        let r = self.log.meta_txn(MetaTxn { checks, ops }).await?;
        match r.failed_check {
            None => Ok(p),
            Some(_) => Err(RegistryError::Conflict(
                "Device profile with such name or provision device key already exists!".into(),
            )),
        }
    }

    pub fn default_profile(&self, tenant: Uuid) -> Option<DeviceProfile> {
        self.profile_by_name(tenant, "default")
    }

    /// Creates a device profile named `name` in `tenant` (or returns the existing one).
    pub async fn ensure_profile(&self, tenant: Uuid, name: &str) -> Result<DeviceProfile, RegistryError> {
        if let Some(p) = self.profile_by_name(tenant, name) {
            return Ok(p);
        }
        let p = DeviceProfile {
            id: Uuid::new_v4(),
            tenant_id: tenant,
            name: name.into(),
            description: None,
            is_default: false,
            created_ms: now_ms(),
            provision: Provision::default(),
        };
        self.log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Absent(format!("reg/profile_name/{tenant}/{name}"))],
                ops: profile_ops(&p),
            })
            .await?;
        // Whoever won a race, the profile of that name exists now.
        self.profile_by_name(tenant, name)
            .ok_or_else(|| RegistryError::NotFound(format!("device profile {name}")))
    }

    pub fn device(&self, id: Uuid) -> Option<Device> {
        self.get(&format!("reg/device/{id}"))
    }

    pub fn device_by_name(&self, tenant: Uuid, name: &str) -> Option<Device> {
        let id = self.get_id(&format!("reg/device_name/{tenant}/{name}"))?;
        self.device(id)
    }

    /// The devices of a tenant, by name; at most `max`.
    pub fn devices(&self, tenant: Uuid, max: usize) -> Vec<Device> {
        self.log
            .meta_scan(&format!("reg/device_name/{tenant}/"), max)
            .into_iter()
            .filter_map(|(_, id)| dec::<Uuid>(&id))
            .filter_map(|id| self.device(id))
            .collect()
    }

    pub fn credentials(&self, device: Uuid) -> Option<Credentials> {
        self.get(&format!("reg/cred/{device}"))
    }

    /// The device an access token belongs to.
    pub fn device_by_token(&self, token: &str) -> Option<DeviceRef> {
        self.log
            .meta_get(&token_key(token))
            .and_then(|b| DeviceRef::decode(&b).ok())
    }

    pub async fn create_device(&self, new: NewDevice) -> Result<(Device, Credentials), RegistryError> {
        let name = new.name.trim().to_string();
        if name.is_empty() {
            return Err(RegistryError::Invalid("Device name should be specified!".into()));
        }
        // Refusals first: a device that will not be created must not leave a new profile behind
        // (the checks of the transaction below still decide under concurrency).
        let token = match new.access_token {
            Some(t) if t.is_empty() || t.len() > 128 || t.contains('/') => {
                return Err(RegistryError::Invalid("Invalid access token".into()));
            }
            Some(t) => t,
            None => random_token(),
        };
        if self.device_by_name(new.tenant_id, &name).is_some() {
            return Err(RegistryError::Conflict(
                "Device with such name already exists!".into(),
            ));
        }
        if self.log.meta_get(&token_key(&token)).is_some() {
            return Err(RegistryError::Conflict(
                "Device credentials are already assigned to another device!".into(),
            ));
        }
        let profile = match (new.profile_id, &new.device_type) {
            (Some(id), _) => self
                .profile(id)
                .filter(|p| p.tenant_id == new.tenant_id)
                .ok_or_else(|| RegistryError::Invalid("Device profile is not found!".into()))?,
            (None, Some(t)) if !t.is_empty() => self.ensure_profile(new.tenant_id, t).await?,
            _ => self
                .default_profile(new.tenant_id)
                .ok_or_else(|| RegistryError::NotFound("default device profile".into()))?,
        };
        let now = now_ms();
        let device = Device {
            id: Uuid::new_v4(),
            tenant_id: new.tenant_id,
            customer_id: new.customer_id.unwrap_or(NULL_UUID),
            name,
            device_type: profile.name.clone(),
            label: new.label,
            profile_id: profile.id,
            additional_info: new.additional_info.unwrap_or_else(|| "null".into()),
            created_ms: now,
            version: 1,
        };
        let creds = Credentials {
            id: Uuid::new_v4(),
            device_id: device.id,
            kind: CredentialsType::AccessToken,
            credentials_id: token,
            value: None,
            created_ms: now,
            version: 1,
        };
        let name_key = format!("reg/device_name/{}/{}", device.tenant_id, device.name);
        let tk = token_key(&creds.credentials_id);
        let mut ops = vec![
            MetaOp::Put(format!("reg/device/{}", device.id), enc(&device)),
            MetaOp::Put(name_key.clone(), enc(&device.id)),
            MetaOp::Put(format!("reg/cred/{}", device.id), enc(&creds)),
            MetaOp::Put(tk.clone(), device_ref(&device, "").encode().into()),
        ];
        if let Some(t) = new.transport {
            ops.push(MetaOp::Put(device_transport_key(device.id), enc(&t)));
        }
        let r = self
            .log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Absent(name_key), MetaCheck::Absent(tk)],
                ops,
            })
            .await?;
        match r.failed_check {
            None => Ok((device, creds)),
            Some(0) => Err(RegistryError::Conflict(
                "Device with such name already exists!".into(),
            )),
            Some(_) => Err(RegistryError::Conflict(
                "Device credentials are already assigned to another device!".into(),
            )),
        }
    }

    /// A device's claim window (ThingsBoard's device-side claim): until `now + duration_ms`, a
    /// customer user who knows `secret` may claim the device.
    pub async fn register_claim(
        &self,
        device: Uuid,
        secret: &str,
        duration_ms: i64,
    ) -> Result<(), RegistryError> {
        let claim = Claim {
            secret: secret.to_string(),
            expires_ms: now_ms().saturating_add(duration_ms.max(0)),
        };
        let r = self
            .log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Present(format!("reg/device/{device}"))],
                ops: vec![MetaOp::Put(claim_key(device), enc(&claim))],
            })
            .await?;
        match r.failed_check {
            None => Ok(()),
            Some(_) => Err(RegistryError::NotFound(format!(
                "Device with id [{device}] is not found"
            ))),
        }
    }

    /// A customer claims the device `name` of `tenant` with `secret`: the device must be
    /// unassigned and inside a claim window with that secret. On success it belongs to the
    /// customer and the window is closed.
    pub async fn claim_device(
        &self,
        tenant: Uuid,
        name: &str,
        customer: Uuid,
        secret: &str,
    ) -> Result<Result<Device, ClaimRefusal>, RegistryError> {
        let Some(device) = self.device_by_name(tenant, name) else {
            return Ok(Err(ClaimRefusal::Failure));
        };
        if device.customer_id != NULL_UUID {
            return Ok(Err(ClaimRefusal::Claimed));
        }
        let (dkey, ckey) = (format!("reg/device/{}", device.id), claim_key(device.id));
        let (Some(dbytes), Some(cbytes)) = (self.log.meta_get(&dkey), self.log.meta_get(&ckey)) else {
            return Ok(Err(ClaimRefusal::Failure));
        };
        let Some(claim) = dec::<Claim>(&cbytes) else {
            return Ok(Err(ClaimRefusal::Failure));
        };
        if claim.expires_ms < now_ms() || claim.secret != secret {
            return Ok(Err(ClaimRefusal::Failure));
        }
        let claimed = Device {
            customer_id: customer,
            version: device.version + 1,
            ..device
        };
        let r = self
            .log
            .meta_txn(MetaTxn {
                checks: vec![
                    MetaCheck::Equals(dkey.clone(), dbytes),
                    MetaCheck::Equals(ckey.clone(), cbytes),
                ],
                ops: vec![MetaOp::Put(dkey, enc(&claimed)), MetaOp::Delete(ckey)],
            })
            .await?;
        Ok(match r.failed_check {
            None => Ok(claimed),
            // Changed meanwhile: claimed by someone else, or its window changed.
            Some(_) => Err(ClaimRefusal::Claimed),
        })
    }

    /// Takes a device back from its customer (ThingsBoard's re-claim).
    pub async fn reclaim_device(&self, device: Uuid) -> Result<Device, RegistryError> {
        let dkey = format!("reg/device/{device}");
        let bytes = self
            .log
            .meta_get(&dkey)
            .ok_or_else(|| RegistryError::NotFound(format!("Device with id [{device}] is not found")))?;
        let d: Device = dec(&bytes).ok_or_else(|| RegistryError::NotFound(dkey.clone()))?;
        let freed = Device {
            customer_id: NULL_UUID,
            version: d.version + 1,
            ..d
        };
        let r = self
            .log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Equals(dkey.clone(), bytes)],
                ops: vec![MetaOp::Put(dkey, enc(&freed))],
            })
            .await?;
        match r.failed_check {
            None => Ok(freed),
            Some(_) => Err(RegistryError::Conflict(
                "device changed concurrently; retry".into(),
            )),
        }
    }

    /// Updates a device's name, label and `additionalInfo` (JSON text).
    pub async fn update_device(
        &self,
        id: Uuid,
        name: &str,
        label: Option<String>,
        additional_info: Option<String>,
        transport: Option<String>,
    ) -> Result<Device, RegistryError> {
        let name = name.trim();
        if name.is_empty() {
            return Err(RegistryError::Invalid("Device name should be specified!".into()));
        }
        let key = format!("reg/device/{id}");
        let bytes = self
            .log
            .meta_get(&key)
            .ok_or_else(|| RegistryError::NotFound(format!("Device with id [{id}] is not found")))?;
        let old: Device = dec(&bytes).ok_or_else(|| RegistryError::NotFound(key.clone()))?;
        let new = Device {
            name: name.to_string(),
            label,
            additional_info: additional_info.unwrap_or_else(|| "null".into()),
            version: old.version + 1,
            ..old.clone()
        };
        let mut checks = vec![MetaCheck::Equals(key.clone(), bytes)];
        let mut ops = vec![
            MetaOp::Put(key, enc(&new)),
            match transport {
                Some(t) => MetaOp::Put(device_transport_key(id), enc(&t)),
                None => MetaOp::Delete(device_transport_key(id)),
            },
        ];
        if new.name != old.name {
            let name_key = format!("reg/device_name/{}/{}", new.tenant_id, new.name);
            checks.push(MetaCheck::Absent(name_key.clone()));
            ops.push(MetaOp::Delete(format!(
                "reg/device_name/{}/{}",
                old.tenant_id, old.name
            )));
            ops.push(MetaOp::Put(name_key, enc(&id)));
        }
        let r = self.log.meta_txn(MetaTxn { checks, ops }).await?;
        match r.failed_check {
            None => Ok(new),
            Some(0) => Err(RegistryError::Conflict(
                "device changed concurrently; retry".into(),
            )),
            Some(_) => Err(RegistryError::Conflict(
                "Device with such name already exists!".into(),
            )),
        }
    }

    /// Deletes a device, its name index and its credentials; transports drop its sessions when
    /// they see the token disappear.
    pub async fn delete_device(&self, id: Uuid) -> Result<Device, RegistryError> {
        let key = format!("reg/device/{id}");
        let current = self
            .log
            .meta_get(&key)
            .ok_or_else(|| RegistryError::NotFound(format!("Device with id [{id}] is not found")))?;
        let device: Device = dec(&current).ok_or_else(|| RegistryError::NotFound(key.clone()))?;
        let mut ops = vec![
            MetaOp::Delete(key.clone()),
            MetaOp::Delete(format!("reg/device_name/{}/{}", device.tenant_id, device.name)),
            MetaOp::Delete(format!("reg/cred/{id}")),
            MetaOp::Delete(device_transport_key(id)),
        ];
        if let Some(c) = self.credentials(id) {
            ops.push(MetaOp::Delete(credentials_key(&c)));
        }
        // Its relations go with it, as in ThingsBoard.
        ops.extend(self.relation_delete_ops(&crate::relations::EntityRef {
            entity_type: "DEVICE".into(),
            id,
        }));
        let r = self
            .log
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Equals(key, current)],
                ops,
            })
            .await?;
        if !r.applied {
            return Err(RegistryError::Conflict(
                "device changed concurrently; retry".into(),
            ));
        }
        Ok(device)
    }

    /// A device, the key of its credentials, their stored bytes (for an `Equals` check) and
    /// their decoded form.
    fn current_credentials(
        &self,
        device_id: Uuid,
    ) -> Result<(Device, String, Bytes, Credentials), RegistryError> {
        let device = self
            .device(device_id)
            .ok_or_else(|| RegistryError::NotFound(format!("Device with id [{device_id}] is not found")))?;
        let ckey = format!("reg/cred/{device_id}");
        let current = self
            .log
            .meta_get(&ckey)
            .ok_or_else(|| RegistryError::NotFound("device credentials".into()))?;
        let old: Credentials = dec(&current).ok_or_else(|| RegistryError::NotFound(ckey.clone()))?;
        Ok((device, ckey, current, old))
    }

    /// Replaces a device's credentials with MQTT basic ones (ThingsBoard's `MQTT_BASIC`: any of
    /// client id and user name, optionally a password).
    pub async fn update_basic(
        &self,
        device_id: Uuid,
        client_id: &str,
        user_name: &str,
        password: &str,
    ) -> Result<Credentials, RegistryError> {
        if client_id.is_empty() && user_name.is_empty() {
            return Err(RegistryError::Invalid(
                "Both mqtt client id and user name are empty!".into(),
            ));
        }
        if client_id.is_empty() && !password.is_empty() && user_name.is_empty() {
            return Err(RegistryError::Invalid("Password requires a user name".into()));
        }
        let hash = mqtt_basic_hash(client_id, user_name);
        let value = serde_json::json!({"clientId": client_id, "userName": user_name, "password": password});
        self.replace_credentials(
            device_id,
            CredentialsType::MqttBasic,
            hash,
            Some(value.to_string()),
            password,
        )
        .await
    }

    /// Replaces a device's access token.
    pub async fn update_token(&self, device_id: Uuid, token: String) -> Result<Credentials, RegistryError> {
        if token.is_empty() || token.len() > 128 || token.contains('/') {
            return Err(RegistryError::Invalid("Invalid access token".into()));
        }
        self.replace_credentials(device_id, CredentialsType::AccessToken, token, None, "")
            .await
    }

    /// Replaces a device's credentials with an X.509 certificate (PEM or base64 DER), looked up
    /// by the SHA3-256 of its base64 text as ThingsBoard does (`x509_hash`).
    pub async fn update_x509(
        &self,
        device_id: Uuid,
        certificate: &str,
    ) -> Result<Credentials, RegistryError> {
        let cert = certificate.trim();
        if cert.is_empty() {
            return Err(RegistryError::Invalid("X509 certificate is empty".into()));
        }
        let hash = thingraft_proto::records::x509_hash(cert);
        self.replace_credentials(
            device_id,
            CredentialsType::X509Certificate,
            hash,
            Some(cert.to_string()),
            "",
        )
        .await
    }

    /// Replaces a device's credentials, checking that nobody changed them meanwhile and that no
    /// other device holds the new ones.
    async fn replace_credentials(
        &self,
        device_id: Uuid,
        kind: CredentialsType,
        credentials_id: String,
        value: Option<String>,
        password: &str,
    ) -> Result<Credentials, RegistryError> {
        let (device, ckey, current, old) = self.current_credentials(device_id)?;
        if old.kind == kind && old.credentials_id == credentials_id && old.value == value {
            return Ok(old);
        }
        let new = Credentials {
            credentials_id,
            kind,
            value,
            version: old.version + 1,
            ..old.clone()
        };
        let (old_key, new_key) = (credentials_key(&old), credentials_key(&new));
        let mut ops = Vec::new();
        let mut checks = vec![MetaCheck::Equals(ckey.clone(), current)];
        if old_key != new_key {
            ops.push(MetaOp::Delete(old_key));
            checks.push(MetaCheck::Absent(new_key.clone()));
        }
        ops.push(MetaOp::Put(
            new_key,
            device_ref(&device, password).encode().into(),
        ));
        ops.push(MetaOp::Put(ckey, enc(&new)));
        let r = self.log.meta_txn(MetaTxn { checks, ops }).await?;
        match r.failed_check {
            None => Ok(new),
            Some(0) => Err(RegistryError::Conflict(
                "credentials changed concurrently; retry".into(),
            )),
            Some(_) => Err(RegistryError::Conflict(
                "Device credentials are already assigned to another device!".into(),
            )),
        }
    }
}

/// A device's open claim window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Claim {
    secret: String,
    expires_ms: i64,
}

/// Why a claim was refused (ThingsBoard's `ClaimResponse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefusal {
    /// The device already belongs to a customer.
    Claimed,
    /// No open window with that secret (or no such device).
    Failure,
}

fn claim_key(device: Uuid) -> String {
    format!("reg/claim/{device}")
}

fn provision_key(key: &str) -> String {
    format!("reg/provision/{key}")
}

/// The metadata-map key transports look credentials up by.
fn credentials_key(c: &Credentials) -> String {
    match c.kind {
        CredentialsType::AccessToken => token_key(&c.credentials_id),
        CredentialsType::MqttBasic => basic_key(&c.credentials_id),
        CredentialsType::X509Certificate => thingraft_proto::records::x509_key_of_hash(&c.credentials_id),
    }
}

/// What transports know of a device (stored under its credentials key).
pub fn device_ref(d: &Device, password: &str) -> DeviceRef {
    DeviceRef {
        device: *d.id.as_bytes(),
        tenant: *d.tenant_id.as_bytes(),
        name: d.name.clone(),
        device_type: d.device_type.clone(),
        password: password.into(),
    }
}

fn device_transport_key(device: Uuid) -> String {
    format!("reg/device_transport/{device}")
}

fn profile_transport_key(profile: Uuid) -> String {
    format!("reg/profile_transport/{profile}")
}

fn profile_ops(p: &DeviceProfile) -> Vec<MetaOp> {
    vec![
        MetaOp::Put(format!("reg/profile/{}", p.id), enc(p)),
        MetaOp::Put(format!("reg/profile_name/{}/{}", p.tenant_id, p.name), enc(&p.id)),
    ]
}
