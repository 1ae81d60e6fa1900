//! OTA packages (firmware and software): their info and their data in the metadata map, the
//! data in 64 KiB chunks, and which package a device is assigned.
//!
//! Keys: `reg/ota/<id>` (info), `reg/ota_tv/<tenant>/<kind>/<title>/<version>` (unique title and
//! version), `reg/ota_data/<id>/<chunk:08>` (data), `reg/device_ota/<device>/<kind>` (a
//! device's own assignment), `reg/profile_ota/<profile>/<kind>` (a device profile's assignment,
//! which the profile's devices without their own follow, as in ThingsBoard).

use serde::{Deserialize, Serialize};
use sha2::Digest;
use thingraft_log::{MetaCheck, MetaOp, MetaTxn};
use uuid::Uuid;

use crate::registry::{Registry, RegistryError, dec, enc, now_ms};

/// Bytes per stored chunk of package data.
const CHUNK_BYTES: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtaKind {
    Firmware,
    Software,
}

impl OtaKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OtaKind::Firmware => "FIRMWARE",
            OtaKind::Software => "SOFTWARE",
        }
    }

    pub fn parse(s: &str) -> Option<OtaKind> {
        match s {
            "FIRMWARE" => Some(OtaKind::Firmware),
            "SOFTWARE" => Some(OtaKind::Software),
            _ => None,
        }
    }

    /// The prefix of its shared attributes (`fw_title`, `sw_version`, ...).
    pub fn attribute_prefix(self) -> &'static str {
        match self {
            OtaKind::Firmware => "fw",
            OtaKind::Software => "sw",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaPackage {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub kind: OtaKind,
    pub title: String,
    pub version: String,
    pub profile_id: Option<Uuid>,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub checksum_algorithm: Option<String>,
    pub checksum: Option<String>,
    /// Bytes of data; `None` until uploaded.
    pub size: Option<u64>,
    pub created_ms: i64,
}

/// The checksum of `data` by one of ThingsBoard's algorithms (those of the SHA-2 family here).
pub fn checksum(algorithm: &str, data: &[u8]) -> Option<String> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Some(match algorithm {
        "SHA256" => hex(&sha2::Sha256::digest(data)),
        "SHA384" => hex(&sha2::Sha384::digest(data)),
        "SHA512" => hex(&sha2::Sha512::digest(data)),
        _ => return None,
    })
}

fn info_key(id: Uuid) -> String {
    format!("reg/ota/{id}")
}

fn data_key(id: Uuid, chunk: usize) -> String {
    format!("reg/ota_data/{id}/{chunk:08}")
}

fn assignment_key(device: Uuid, kind: OtaKind) -> String {
    format!("reg/device_ota/{device}/{}", kind.as_str())
}

fn profile_assignment_key(profile: Uuid, kind: OtaKind) -> String {
    format!("reg/profile_ota/{profile}/{}", kind.as_str())
}

impl OtaPackage {
    /// The shared attributes a device's SDK watches for this package (`fw_title`,
    /// `fw_version`, `fw_size`, `fw_checksum`, `fw_checksum_algorithm`; `sw_*` for software);
    /// `None` until its data is uploaded.
    pub fn attributes(&self) -> Option<Vec<(String, thingraft_proto::device::Value)>> {
        use thingraft_proto::device::Value;
        let (Some(size), Some(sum), Some(alg)) = (self.size, &self.checksum, &self.checksum_algorithm) else {
            return None;
        };
        let pre = self.kind.attribute_prefix();
        Some(vec![
            (format!("{pre}_title"), Value::String(self.title.clone())),
            (format!("{pre}_version"), Value::String(self.version.clone())),
            (format!("{pre}_size"), Value::Long(size as i64)),
            (format!("{pre}_checksum"), Value::String(sum.clone())),
            (format!("{pre}_checksum_algorithm"), Value::String(alg.clone())),
        ])
    }
}

impl Registry {
    /// Creates a package's info (its data comes with [`Registry::upload_ota`]).
    pub async fn create_ota(
        &self,
        tenant: Uuid,
        kind: OtaKind,
        title: &str,
        version: &str,
        profile_id: Option<Uuid>,
    ) -> Result<OtaPackage, RegistryError> {
        if title.trim().is_empty() || version.trim().is_empty() {
            return Err(RegistryError::Invalid(
                "OTA package title and version should be specified!".into(),
            ));
        }
        let p = OtaPackage {
            id: Uuid::new_v4(),
            tenant_id: tenant,
            kind,
            title: title.trim().into(),
            version: version.trim().into(),
            profile_id,
            file_name: None,
            content_type: None,
            checksum_algorithm: None,
            checksum: None,
            size: None,
            created_ms: now_ms(),
        };
        let tv = format!("reg/ota_tv/{tenant}/{}/{}/{}", kind.as_str(), p.title, p.version);
        let r = self
            .log()
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Absent(tv.clone())],
                ops: vec![MetaOp::Put(tv, enc(&p.id)), MetaOp::Put(info_key(p.id), enc(&p))],
            })
            .await?;
        match r.failed_check {
            None => Ok(p),
            Some(_) => Err(RegistryError::Conflict(
                "OtaPackage with such title and version already exists!".into(),
            )),
        }
    }

    pub fn ota(&self, id: Uuid) -> Option<OtaPackage> {
        self.log().meta_get(&info_key(id)).and_then(|b| dec(&b))
    }

    /// Stores a package's data (once) with its checksum: the chunks first, the info last, so a
    /// package has a size only when all of its data is there.
    pub async fn upload_ota(
        &self,
        id: Uuid,
        file_name: Option<String>,
        content_type: Option<String>,
        algorithm: &str,
        data: &[u8],
    ) -> Result<OtaPackage, RegistryError> {
        let key = info_key(id);
        let bytes = self
            .log()
            .meta_get(&key)
            .ok_or_else(|| RegistryError::NotFound(format!("OtaPackage with id [{id}] is not found")))?;
        let p: OtaPackage = dec(&bytes).ok_or_else(|| RegistryError::NotFound(key.clone()))?;
        if p.size.is_some() {
            return Err(RegistryError::Invalid(
                "OTA package data is already uploaded".into(),
            ));
        }
        let sum = checksum(algorithm, data)
            .ok_or_else(|| RegistryError::Invalid(format!("Unsupported checksum algorithm {algorithm}")))?;
        for (i, chunk) in data.chunks(CHUNK_BYTES).enumerate() {
            self.log()
                .meta_txn(MetaTxn {
                    checks: vec![MetaCheck::Equals(key.clone(), bytes.clone())],
                    ops: vec![MetaOp::Put(data_key(id, i), chunk.to_vec().into())],
                })
                .await?;
        }
        let done = OtaPackage {
            file_name,
            content_type,
            checksum_algorithm: Some(algorithm.into()),
            checksum: Some(sum),
            size: Some(data.len() as u64),
            ..p
        };
        let r = self
            .log()
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Equals(key.clone(), bytes)],
                ops: vec![MetaOp::Put(key, enc(&done))],
            })
            .await?;
        match r.failed_check {
            None => Ok(done),
            Some(_) => Err(RegistryError::Conflict("OTA package changed concurrently".into())),
        }
    }

    /// `len` bytes of a package's data from `offset` (fewer at its end; empty past it).
    pub fn ota_range(&self, p: &OtaPackage, offset: u64, len: u64) -> Option<Vec<u8>> {
        let size = p.size?;
        let end = size.min(offset.saturating_add(len));
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut at = offset;
        while at < end {
            let chunk = (at / CHUNK_BYTES as u64) as usize;
            let data = self.log().meta_get(&data_key(p.id, chunk))?;
            let from = (at % CHUNK_BYTES as u64) as usize;
            let to = ((end - chunk as u64 * CHUNK_BYTES as u64) as usize).min(data.len());
            if from >= to {
                return None;
            }
            out.extend_from_slice(&data[from..to]);
            at += (to - from) as u64;
        }
        Some(out)
    }

    /// Assigns `package` (its kind) to `device`.
    pub async fn assign_ota(&self, device: Uuid, p: &OtaPackage) -> Result<(), RegistryError> {
        self.log()
            .meta_txn(MetaTxn {
                checks: vec![],
                ops: vec![MetaOp::Put(assignment_key(device, p.kind), enc(&p.id))],
            })
            .await?;
        Ok(())
    }

    /// The package of `kind` assigned to `device` itself.
    pub fn device_own_ota(&self, device: Uuid, kind: OtaKind) -> Option<OtaPackage> {
        let id: Uuid = self
            .log()
            .meta_get(&assignment_key(device, kind))
            .and_then(|b| dec(&b))?;
        self.ota(id)
    }

    /// The package of `kind` that `device` is to run: its own, else its profile's.
    pub fn device_ota(&self, device: Uuid, kind: OtaKind) -> Option<OtaPackage> {
        self.device_own_ota(device, kind).or_else(|| {
            let profile = self.device(device)?.profile_id;
            self.profile_ota(profile, kind)
        })
    }

    /// Assigns `package` (its kind) to the device profile `profile`.
    pub async fn assign_profile_ota(&self, profile: Uuid, p: &OtaPackage) -> Result<(), RegistryError> {
        self.log()
            .meta_txn(MetaTxn {
                checks: vec![MetaCheck::Present(format!("reg/profile/{profile}"))],
                ops: vec![MetaOp::Put(profile_assignment_key(profile, p.kind), enc(&p.id))],
            })
            .await?
            .failed_check
            .map_or(Ok(()), |_| {
                Err(RegistryError::NotFound(format!(
                    "Device profile with id [{profile}] is not found"
                )))
            })
    }

    /// The package of `kind` assigned to the device profile `profile`.
    pub fn profile_ota(&self, profile: Uuid, kind: OtaKind) -> Option<OtaPackage> {
        let id: Uuid = self
            .log()
            .meta_get(&profile_assignment_key(profile, kind))
            .and_then(|b| dec(&b))?;
        self.ota(id)
    }
}

impl crate::EngineHandle {
    /// Sets `device`'s shared OTA attributes for `p` (appended to the device's partition;
    /// returns once committed). Nothing when `p` has no data yet.
    pub async fn push_ota_attributes(
        &self,
        device: &crate::registry::Device,
        p: &OtaPackage,
    ) -> Result<Option<thingraft_log::Appended>, thingraft_log::LogError> {
        use thingraft_proto::records::{Ingest, IngestMsg, Scope};
        let Some(values) = p.attributes() else {
            return Ok(None);
        };
        let ingest = Ingest {
            tenant: *device.tenant_id.as_bytes(),
            device: *device.id.as_bytes(),
            ts_ms: now_ms(),
            session: None,
            msg: IngestMsg::SaveAttributes {
                scope: Scope::Shared,
                values,
            },
        };
        self.submit(&ingest).await.map(Some)
    }

    /// For a device just created: the attributes of the packages its profile assigns, for each
    /// kind the device has no package of its own. Failures are logged; the device stays.
    pub async fn push_profile_ota(&self, device: &crate::registry::Device) {
        for kind in [OtaKind::Firmware, OtaKind::Software] {
            if self.registry.device_own_ota(device.id, kind).is_some() {
                continue;
            }
            let Some(p) = self.registry.profile_ota(device.profile_id, kind) else {
                continue;
            };
            if let Err(e) = self.push_ota_attributes(device, &p).await {
                tracing::warn!(device = %device.id, error = %e, "profile OTA attributes not set");
            }
        }
    }
}
