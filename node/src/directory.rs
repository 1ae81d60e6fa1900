//! The transports' registry port ([`Directory`]) on the engine's registry: gateways and the
//! child devices they report for, and device provisioning.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use thingraft_engine::EngineHandle;
use thingraft_engine::registry::{
    NULL_UUID, NewDevice, ProvisionType, RegistryError, device_ref, now_ms, random_token,
};
use thingraft_engine::relations::{COMMON, CREATED, EntityRef, Relation};
use thingraft_proto::device::Value as TypedValue;
use thingraft_proto::records::{DeviceRef, EntityId, Ingest, IngestMsg, Scope};
use thingraft_transport_common::proto_payload::{self, DeviceTransport, ProtoSchemas};
use thingraft_transport_common::{ClaimError, Directory, MqttTopics, OtaInfo, OtaKind, PowerMode};
use uuid::Uuid;

pub struct EngineDirectory {
    pub engine: EngineHandle,
    /// `[security] claim_allowed_by_default`.
    pub claim_allowed_by_default: bool,
    /// Compiled protobuf schemas per (profile, transport), with the configuration text they
    /// were compiled from: a profile update shows as a different text and compiles again.
    pub schemas: Mutex<HashMap<(Uuid, DeviceTransport), CompiledSchemas>>,
}

/// A profile's transport configuration text and the schemas compiled from it (`None`: JSON).
type CompiledSchemas = (String, Option<Arc<ProtoSchemas>>);

/// The server attribute that lets a device be claimed when claiming is not allowed by default.
pub const CLAIMING_ALLOWED: &str = "claimingAllowed";

impl EngineDirectory {
    /// Whether the device's server attribute `claimingAllowed` is `true` (this replica's store).
    fn claiming_allowed_attribute(&self, device: &EntityId) -> bool {
        self.engine
            .store
            .attributes(device, Scope::Server, &[CLAIMING_ALLOWED.to_string()])
            .ok()
            .and_then(|v| v.into_iter().next())
            .is_some_and(|(_, tv)| tv.value == TypedValue::Bool(true))
    }
}

impl Directory for EngineDirectory {
    fn coap_power_mode(&self, device: &EntityId) -> PowerMode {
        let registry = &self.engine.registry;
        let id = Uuid::from_bytes(*device);
        let coap = |text: String| {
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .filter(|t| t["type"] == "COAP")
        };
        // ThingsBoard: the profile's `clientSettings`, with the device's own COAP transport
        // configuration taking the place of the mode and of each timer it sets.
        let mut settings = registry
            .device(id)
            .and_then(|d| registry.profile_transport(d.profile_id))
            .and_then(coap)
            .map_or_else(|| serde_json::json!({}), |t| t["clientSettings"].clone());
        if !settings.is_object() {
            settings = serde_json::json!({});
        }
        if let Some(own) = registry.device_transport(id).and_then(coap) {
            for k in [
                "powerMode",
                "psmActivityTimer",
                "edrxCycle",
                "pagingTransmissionWindow",
            ] {
                if !own[k].is_null() {
                    settings[k] = own[k].clone();
                }
            }
        }
        PowerMode::of_client_settings(&settings)
    }

    fn mqtt_topics(&self, device: &EntityId) -> Option<Arc<MqttTopics>> {
        let registry = &self.engine.registry;
        let profile = registry.device(Uuid::from_bytes(*device))?.profile_id;
        let t: serde_json::Value = serde_json::from_str(&registry.profile_transport(profile)?).ok()?;
        (t["type"] == "MQTT")
            .then(|| MqttTopics::of_config(&t))
            .flatten()
            .map(Arc::new)
    }

    fn proto_schemas(&self, device: &EntityId, transport: DeviceTransport) -> Option<Arc<ProtoSchemas>> {
        let registry = &self.engine.registry;
        let profile = registry.device(Uuid::from_bytes(*device))?.profile_id;
        let text = registry.profile_transport(profile)?;
        let mut cache = self
            .schemas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached, schemas)) = cache.get(&(profile, transport))
            && *cached == text
        {
            return schemas.clone();
        }
        // The REST API compiled it before saving, so this fails only for a configuration
        // written by another version; its devices then fall back to JSON, said once here.
        let schemas = serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| e.to_string())
            .and_then(|t| proto_payload::schemas_for(&t, transport).map_err(|e| e.0))
            .inspect_err(
                |e| tracing::warn!(%profile, error = %e, "device profile's protobuf schemas do not compile"),
            )
            .ok()
            .flatten()
            .map(Arc::new);
        cache.insert((profile, transport), (text, schemas.clone()));
        schemas
    }

    fn is_gateway(&self, device: &EntityId) -> bool {
        self.engine
            .registry
            .device(Uuid::from_bytes(*device))
            .and_then(|d| serde_json::from_str::<serde_json::Value>(&d.additional_info).ok())
            .and_then(|info| info.get("gateway").and_then(serde_json::Value::as_bool))
            .unwrap_or(false)
    }

    fn child_device(
        &self,
        gateway: &DeviceRef,
        name: &str,
        device_type: &str,
    ) -> Pin<Box<dyn Future<Output = Result<DeviceRef, String>> + Send>> {
        let engine = self.engine.clone();
        let registry = self.engine.registry.clone();
        let tenant = Uuid::from_bytes(gateway.tenant);
        let gateway_id = Uuid::from_bytes(gateway.device);
        let name = name.to_string();
        let device_type = device_type.to_string();
        Box::pin(async move {
            // Twice at most: a lost race to create the same name finds the winner's device.
            for _ in 0..2 {
                if let Some(d) = registry.device_by_name(tenant, &name) {
                    return Ok(device_ref(&d, ""));
                }
                // A child belongs to its gateway's customer, as in ThingsBoard.
                let customer = registry
                    .device(gateway_id)
                    .map(|g| g.customer_id)
                    .filter(|c| *c != NULL_UUID);
                let new = NewDevice {
                    tenant_id: tenant,
                    customer_id: customer,
                    name: name.clone(),
                    device_type: Some(device_type.clone()),
                    ..NewDevice::default()
                };
                match registry.create_device(new).await {
                    Ok((d, _)) => {
                        tracing::info!(device = %d.name, gateway = %gateway_id, "child device created");
                        // As ThingsBoard: the gateway `Created` the device.
                        let created = Relation {
                            from: EntityRef {
                                entity_type: "DEVICE".into(),
                                id: gateway_id,
                            },
                            to: EntityRef {
                                entity_type: "DEVICE".into(),
                                id: d.id,
                            },
                            kind: CREATED.into(),
                            group: COMMON.into(),
                            additional_info: "null".into(),
                        };
                        if let Err(e) = registry.save_relation(&created).await {
                            tracing::warn!(device = %d.name, error = %e, "gateway relation not saved");
                        }
                        engine.push_profile_ota(&d).await;
                        return Ok(device_ref(&d, ""));
                    }
                    Err(RegistryError::Conflict(_)) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
            Err(format!("device {name:?} could not be created"))
        })
    }

    fn provision(&self, request: &[u8]) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>> {
        let engine = self.engine.clone();
        let v: Result<Value, String> = serde_json::from_slice(request).map_err(|e| e.to_string());
        Box::pin(async move {
            let v = v?;
            if !v.is_object() {
                return Err("a provision request must be a JSON object".into());
            }
            Ok(provision(engine, v).await)
        })
    }

    fn claim(
        &self,
        device: &DeviceRef,
        secret: String,
        duration_ms: i64,
    ) -> Pin<Box<dyn Future<Output = Result<(), ClaimError>> + Send>> {
        let registry = self.engine.registry.clone();
        let id = Uuid::from_bytes(device.device);
        // As ThingsBoard: only an unassigned device may open a claim window, and, unless claiming
        // is allowed by default, only one whose server attribute `claimingAllowed` is true.
        let allowed = self.claim_allowed_by_default || self.claiming_allowed_attribute(&device.device);
        Box::pin(async move {
            let assigned = registry.device(id).is_some_and(|d| d.customer_id != NULL_UUID);
            if assigned {
                return Err(ClaimError::Refused(format!("device {id} is already claimed")));
            }
            if !allowed {
                return Err(ClaimError::Refused(format!(
                    "claiming is not allowed for device {id}: its server attribute {CLAIMING_ALLOWED} is not true"
                )));
            }
            registry
                .register_claim(id, &secret, duration_ms)
                .await
                .map_err(|e| match e {
                    RegistryError::NotFound(m) => ClaimError::Refused(m),
                    other => ClaimError::Failed(other.to_string()),
                })
        })
    }

    fn ota_info(&self, device: &EntityId, kind: OtaKind) -> Option<OtaInfo> {
        let p = self
            .engine
            .registry
            .device_ota(Uuid::from_bytes(*device), ota_kind(kind))?;
        Some(OtaInfo {
            title: p.title,
            version: p.version,
            size: p.size?,
            file_name: p.file_name,
        })
    }

    fn ota_read(&self, device: &EntityId, kind: OtaKind, offset: u64, len: u64) -> Option<Vec<u8>> {
        let registry = &self.engine.registry;
        let p = registry.device_ota(Uuid::from_bytes(*device), ota_kind(kind))?;
        registry.ota_range(&p, offset, len)
    }
}

fn ota_kind(k: OtaKind) -> thingraft_engine::ota::OtaKind {
    match k {
        OtaKind::Firmware => thingraft_engine::ota::OtaKind::Firmware,
        OtaKind::Software => thingraft_engine::ota::OtaKind::Software,
    }
}

const NOT_FOUND: &str = r#"{"errorMsg":"Provision data was not found!","status":"NOT_FOUND"}"#;
const FAILURE: &str = r#"{"errorMsg":"Failed to provision device!","status":"FAILURE"}"#;

/// ThingsBoard's device provisioning (`DeviceProvisionServiceImpl`) on the registry.
async fn provision(engine: EngineHandle, v: Value) -> String {
    let registry = &engine.registry;
    let s = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|x| !x.is_empty())
            .map(String::from)
    };
    let (Some(key), Some(secret)) = (s("provisionDeviceKey"), s("provisionDeviceSecret")) else {
        return NOT_FOUND.into();
    };
    let Some(profile) = registry.profile_by_provision_key(&key).filter(|p| {
        p.provision.kind != ProvisionType::Disabled && p.provision.secret.as_deref() == Some(secret.as_str())
    }) else {
        tracing::info!("provisioning refused: unknown key or wrong secret");
        return NOT_FOUND.into();
    };
    let name = s("deviceName").unwrap_or_else(random_token);
    let kind = s("credentialsType").unwrap_or_else(|| "ACCESS_TOKEN".into());
    let device = match profile.provision.kind {
        ProvisionType::AllowCreateNewDevices => {
            let new = NewDevice {
                tenant_id: profile.tenant_id,
                name: name.clone(),
                profile_id: Some(profile.id),
                access_token: if kind == "ACCESS_TOKEN" { s("token") } else { None },
                ..NewDevice::default()
            };
            match registry.create_device(new).await {
                Ok((d, _)) => {
                    engine.push_profile_ota(&d).await;
                    d
                }
                Err(e) => {
                    tracing::info!(device = %name, error = %e, "provisioning failed");
                    return FAILURE.into();
                }
            }
        }
        ProvisionType::CheckPreProvisionedDevices => {
            let Some(d) = registry
                .device_by_name(profile.tenant_id, &name)
                .filter(|d| d.profile_id == profile.id)
            else {
                return NOT_FOUND.into();
            };
            match registry.mark_provisioned(d.id).await {
                Ok(true) => d,
                Ok(false) => {
                    tracing::info!(device = %name, "provisioning refused: already provisioned");
                    return FAILURE.into();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "provisioning failed");
                    return FAILURE.into();
                }
            }
        }
        ProvisionType::Disabled => return NOT_FOUND.into(),
    };
    let value = match kind.as_str() {
        "ACCESS_TOKEN" => match s("token") {
            Some(t) => registry
                .update_token(device.id, t.clone())
                .await
                .map(|_| Value::String(t)),
            None => registry
                .credentials(device.id)
                .map(|c| Value::String(c.credentials_id))
                .ok_or_else(|| RegistryError::NotFound("credentials".into())),
        },
        "MQTT_BASIC" => {
            let (client, user, pass) = (
                s("clientId").unwrap_or_default(),
                s("username").or_else(|| s("userName")).unwrap_or_default(),
                s("password").unwrap_or_default(),
            );
            registry
                .update_basic(device.id, &client, &user, &pass)
                .await
                .map(|_| json!({"clientId": client, "userName": user, "password": pass}))
        }
        "X509_CERTIFICATE" => match s("hash") {
            Some(cert) => registry
                .update_x509(device.id, &cert)
                .await
                .map(|c| Value::String(c.credentials_id)),
            None => Err(RegistryError::Invalid(
                "X509 provisioning without a certificate".into(),
            )),
        },
        other => Err(RegistryError::Invalid(format!(
            "unknown credentials type {other}"
        ))),
    };
    let value = match value {
        Ok(v) => v,
        Err(e) => {
            tracing::info!(device = %name, error = %e, "provisioning failed");
            return FAILURE.into();
        }
    };
    let state = Ingest {
        tenant: *device.tenant_id.as_bytes(),
        device: *device.id.as_bytes(),
        ts_ms: now_ms(),
        session: None,
        msg: IngestMsg::SaveAttributes {
            scope: Scope::Server,
            values: vec![("provisionState".into(), TypedValue::String("provisioned".into()))],
        },
    };
    if let Err(e) = engine.submit(&state).await {
        tracing::warn!(error = %e, "provisionState not recorded");
    }
    tracing::info!(device = %device.name, credentials = %kind, "device provisioned");
    json!({"credentialsType": kind, "credentialsValue": value, "status": "SUCCESS"}).to_string()
}
