//! The transports' registry port ([`Directory`]) on the engine's registry: gateways and the
//! child devices they report for.

use std::future::Future;
use std::pin::Pin;

use thingraft_engine::EngineHandle;
use thingraft_engine::registry::{NULL_UUID, NewDevice, RegistryError, device_ref};
use thingraft_proto::records::{DeviceRef, EntityId};
use thingraft_transport_common::Directory;
use uuid::Uuid;

pub struct EngineDirectory {
    pub engine: EngineHandle,
}

impl Directory for EngineDirectory {
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
                        return Ok(device_ref(&d, ""));
                    }
                    Err(RegistryError::Conflict(_)) => continue,
                    Err(e) => return Err(e.to_string()),
                }
            }
            Err(format!("device {name:?} could not be created"))
        })
    }
}
